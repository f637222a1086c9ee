"""Fixtures for the root-only integration tests: the multi-node lab (deploy/lab/lab.py).
Every test that uses the lab is marked `root` (see tests/conftest.py).

One lab per test module (the lab allows one per machine, and each module may want its
own shape); it is torn down at the end of the module even when tests fail or are
interrupted. Lab processes run inside the lab's
namespaces only; the tests talk to them through `lab.run(node, argv)`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pluggy
import pytest

import lab as lab_mod

REPO = Path(__file__).resolve().parents[2]

PROGS = REPO / "deploy" / "lab" / "progs"


def _unreadable_for_lab_users(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot traverse."""
    for parent in [*reversed(path.parents), path]:
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses the lab needs root, whether or not its module says so; as another
    # user tests/conftest.py then leaves it out (and says so).
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)
    # As root: lab users (alice, bob) run the checkout's adoptctl and read its files.
    if os.geteuid() != 0 or not any(item.get_closest_marker("root") for item in items):
        return
    blocked = _unreadable_for_lab_users(REPO / ".venv" / "bin")
    if blocked is not None:
        raise pytest.UsageError(
            f"{blocked} is not searchable by other users, so the lab users cannot run "
            f"this checkout's programs: clone it somewhere world-readable (e.g. /opt)")


def it_lab(nodes: int = 2) -> lab_mod.Lab:
    """The integration tests' lab, of 2 nodes unless said (not up yet). CALLERID_IT_LAB=NAME
    runs the tests in a lab of that instance name (and its own directory), so that two
    test runs can share the machine. A module that wants a lab of another shape (e.g. with
    Slurm) overrides the ``lab`` fixture with one built from this."""
    name = os.environ.get("CALLERID_IT_LAB", "")
    if name:
        return lab_mod.Lab(dir=f"/run/callerid-lab-it-{name}", nodes=nodes,
                           venv=REPO / ".venv", name=name)
    return lab_mod.Lab(dir="/run/callerid-lab-it", nodes=nodes, venv=REPO / ".venv")


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    the_lab = it_lab()
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


# -- when a test fails: what the lab logged meanwhile, in its report ----------------------
# CI keeps only pytest's output, and the next module's lab replaces these logs, so a
# failing lab test carries the lab's complaints (agent warnings and errors, pam_adopt and
# sshd lines that are not plain successes) from its own run.

LOG_MARKS = pytest.StashKey[dict[Path, int]]()
SHOWN_LINES = 60
ROUTINE = (" INFO ", " DEBUG ", ".info ", ".debug ")


def _lab_logs(the_lab: lab_mod.Lab) -> list[Path]:
    logs = the_lab.dir / "logs"
    return [*sorted(logs.glob("agent-*.log")), logs / "syslog.log"]


@pytest.fixture(autouse=True)
def _mark_lab_logs(request: pytest.FixtureRequest) -> None:
    if "lab" not in request.fixturenames:
        return
    request.node.stash[LOG_MARKS] = _log_marks(request.getfixturevalue("lab"))


def _log_marks(the_lab: lab_mod.Lab) -> dict[Path, int]:
    """Where each lab log ends now."""
    return {p: (p.stat().st_size if p.exists() else 0) for p in _lab_logs(the_lab)}


def _new_lines(path: Path, start: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def lab_complaints(marks: dict[Path, int]) -> str:
    """The non-routine lines each log gained since `marks`, the last SHOWN_LINES of each."""
    out = []
    for path, start in marks.items():
        lines = [line for line in _new_lines(path, start) if not any(r in line for r in ROUTINE)]
        if lines:
            out.append(f"{path.name} ({len(lines)} lines, the last {SHOWN_LINES}):")
            out.extend(lines[-SHOWN_LINES:])
    return "\n".join(out)


@pytest.fixture
def agents_end_sessions_cleanly(lab: lab_mod.Lab) -> Iterator[None]:
    """After the test: every ssh-to-job session an agent opened during it is logged as
    ended (within 10 s), and no agent logged an error or a traceback meanwhile."""
    marks = {p: at for p, at in _log_marks(lab).items() if p.name.startswith("agent-")}
    yield
    deadline = time.monotonic() + 10
    while True:
        lines = [line for p, start in marks.items() for line in _new_lines(p, start)]
        text = "\n".join(lines)
        open_ = set(re.findall(r"opened session (\w+)", text))
        open_ -= set(re.findall(r"session (\w+) ended", text))
        if not open_ or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not open_, f"sessions never logged as ended: {sorted(open_)}"
    bad = [line for line in lines if " ERROR " in line or line.startswith("Traceback")]
    assert not bad, "\n".join(bad[:SHOWN_LINES])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    report = outcome.get_result()
    marks = item.stash.get(LOG_MARKS, None)
    if report.when == "call" and report.failed and marks:
        text = lab_complaints(marks)
        if text:
            report.sections.append(("lab logs (not routine) during this test", text))


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    """A directory every lab user can read and write (outputs of jobs, test programs)."""
    d = Path(tempfile.mkdtemp(prefix="callerid-it-"))
    d.chmod(0o1777)
    for prog in PROGS.iterdir():
        if prog.suffix == ".py":
            shutil.copy(prog, d / prog.name)
            (d / prog.name).chmod(0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
