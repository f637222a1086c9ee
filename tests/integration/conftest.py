"""Fixtures for the root-only integration tests: the multi-node lab (deploy/lab/lab.py).

One lab per test module (the lab allows one per machine, and each module may want its
own shape); it is torn down at the end of the module even when tests fail or are
interrupted. Lab processes run inside the lab's
namespaces only; the tests talk to them through `lab.run(node, argv)`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "lab"))

import lab as lab_mod  # noqa: E402

PROGS = REPO / "deploy" / "lab" / "progs"


def _unreadable_for_lab_users(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot traverse."""
    for parent in [*reversed(path.parents), path]:
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        # Lab users (alice, bob) run the checkout's adoptctl and read its files.
        blocked = _unreadable_for_lab_users(REPO / ".venv" / "bin")
        if blocked is not None and any("root" in item.keywords for item in items):
            raise pytest.UsageError(
                f"{blocked} is not searchable by other users, so the lab users cannot run "
                f"this checkout's programs: clone it somewhere world-readable (e.g. /opt)")
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("the integration tests need root (CI runs as root)")
    skip = pytest.mark.skip(reason="needs root: run `sudo make test`")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    # CALLERID_IT_LAB=NAME runs the tests in a lab of that instance name (and its own
    # directory), so that two test runs can share the machine.
    name = os.environ.get("CALLERID_IT_LAB", "")
    if name:
        the_lab = lab_mod.Lab(dir=f"/run/callerid-lab-it-{name}", nodes=2,
                              venv=REPO / ".venv", name=name)
    else:
        the_lab = lab_mod.Lab(dir="/run/callerid-lab-it", nodes=2, venv=REPO / ".venv")
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


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
