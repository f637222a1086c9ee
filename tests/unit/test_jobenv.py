"""The job environment's names are defined once (node_agent/jobenv.py).

Code that sets them uses the constants; shell snippets, documentation and tests that
read them name them in text, and this test checks every such name against the
definition, so a misspelt or undefined `CALLERID_...` variable fails here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from node_agent import config, jobenv

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bCALLERID_[A-Z0-9_]+\b")
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".example", ".toml", ".sh", ".service", ".proto"}
# callerid-adopt's variables that are not a job's, and what reads them.
NOT_A_JOBS = {
    config.ENV_VAR: "the CLIs: which configuration file",
    "CALLERID_IT_LAB": "the integration tests: the lab instance to run in",
    "CALLERID_LAB_DIR": "the lab: its state directory",
}


def repository_text() -> dict[Path, str]:
    files = {}
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info")
               for p in parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
            files[path] = path.read_text(errors="replace")
    return files


def test_every_callerid_variable_named_anywhere_is_defined() -> None:
    seen: dict[str, set[str]] = {}
    for path, text in repository_text().items():
        for m in NAME.finditer(text):
            seen.setdefault(m.group(), set()).add(str(path.relative_to(REPO)))
    unknown = {name: sorted(where) for name, where in seen.items()
               if name not in jobenv.NAMES and name not in NOT_A_JOBS}
    assert not unknown, f"not in node_agent/jobenv.py: {unknown}"
    # The scan sees what it should: the job's variables are named outside jobenv.py too.
    assert seen[jobenv.JOB_ID] - {"node_agent/jobenv.py"}, seen[jobenv.JOB_ID]


def test_the_names_are_distinct_and_what_a_job_gets() -> None:
    assert len(set(jobenv.NAMES)) == len(jobenv.NAMES)
    assert all(NAME.fullmatch(name) for name in jobenv.NAMES)
    assert set(jobenv.of_job("42", "node2")) == {jobenv.JOB_ID, jobenv.NODE}


# -- the job's namespaces --------------------------------------------------------------------

def fake_proc(tmp_path: Path, kinds: tuple[str, ...] = jobenv.JOIN_KINDS) -> Path:
    """A procfs with the caller ("self"), pid 10 in all of its namespaces, and pid 20 in
    its own of every kind but pid (nsfs inodes compared by (st_dev, st_ino): hard links
    are the same namespace)."""
    proc = tmp_path / "proc"
    for pid in ("self", "10", "20"):
        (proc / pid / "ns").mkdir(parents=True)
    for kind in kinds:
        (proc / "self" / "ns" / kind).write_text("")
        os.link(proc / "self" / "ns" / kind, proc / "10" / "ns" / kind)
        if kind == "pid":
            os.link(proc / "self" / "ns" / kind, proc / "20" / "ns" / kind)
        else:
            (proc / "20" / "ns" / kind).write_text(kind)
    return proc


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_namespace_decision(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, ("mnt", "pid", "net"))
    assert jobenv.namespaces_to_enter(10, str(proc)) == []
    assert jobenv.namespaces_to_enter(20, str(proc)) == [f"{proc}/20/ns/net",
                                                         f"{proc}/20/ns/mnt"]
    assert jobenv.namespaces_to_enter(os.getpid()) == []


def test_open_namespaces_opens_only_those_that_differ_in_join_order(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert jobenv.open_namespaces(10, str(proc)) == []
    got = jobenv.open_namespaces(20, str(proc))
    try:
        assert [kind for kind, _ in got] == [k for k in jobenv.JOIN_KINDS if k != "pid"]
        for kind, fd in got:
            assert os.readlink(f"/proc/self/fd/{fd}") == str(proc / "20" / "ns" / kind)
            assert os.get_inheritable(fd) is False     # close-on-exec: no helper gets it
    finally:
        jobenv.close_all(got)
    assert not any(str(proc) in f for f in open_fds())


def test_open_namespaces_never_opens_the_user_namespace(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, (*jobenv.JOIN_KINDS, "user"))
    got = jobenv.open_namespaces(20, str(proc))
    jobenv.close_all(got)
    assert "user" not in jobenv.JOIN_KINDS and "user" not in [k for k, _ in got]
    assert len(got) == len(jobenv.JOIN_KINDS) - 1


def test_open_namespaces_of_a_gone_process_raises_and_leaks_nothing(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    with pytest.raises(ProcessLookupError):
        jobenv.open_namespaces(30, str(proc))
    # One kind missing (an older kernel): skipped, the others opened.
    os.unlink(proc / "20" / "ns" / "time")
    got = jobenv.open_namespaces(20, str(proc))
    jobenv.close_all(got)
    assert "time" not in [k for k, _ in got] and "mnt" in [k for k, _ in got]


def test_open_namespaces_of_a_process_in_the_agents_namespaces_is_empty() -> None:
    assert jobenv.open_namespaces(os.getpid()) == []


def test_clone_flags_are_sched_h() -> None:
    # <linux/sched.h>; setns() refuses an fd that is not of the flag's kind.
    assert jobenv.CLONE_FLAGS["mnt"] == 0x20000 and jobenv.CLONE_FLAGS["net"] == 0x40000000
    assert set(jobenv.JOIN_KINDS) | {"user"} == set(jobenv.CLONE_FLAGS)
    assert {jobenv.KIND_OF_FLAG[f] for f in jobenv.CLONE_FLAGS.values()} == \
        set(jobenv.CLONE_FLAGS)
