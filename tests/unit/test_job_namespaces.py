"""JobBackend.namespaces: the job's namespaces that an adopted login joins, from each
backend. Native: a real process in a mount namespace of its own, attached to a job of a
registry on a fake cgroup tree. Slurm: a fake stepd (tests/unit/fakes.py) that sends fds
as slurmstepd does (REQUEST_GET_NS_FD before 25.11, REQUEST_GET_NS_FDS from 25.11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import callerid
from callerid import CgroupLayout, Hierarchy
from node_agent import jobenv
from node_agent.jobs.native import JobRegistry
from node_agent.jobs.slurm import SlurmJobs
from node_agent.jobs.slurmconf import EXTERN_STEP, SlurmNodeConfig
from node_agent.jobs.stepd import StepdError
from tests.unit.fakes import V22_05, V26_05, FakeStepd


def settled_open_paths(gone: set[str], timeout: float = 5.0) -> set[str]:
    """open_paths(), once none of `gone` is open or `timeout` passed: the fake stepd's
    thread closes its own copy of an fd just after sending it, racing the test."""
    deadline = time.monotonic() + timeout
    while (paths := open_paths()) & gone and time.monotonic() < deadline:
        time.sleep(0.01)
    return paths


def open_paths() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass
    return out


def ns_id(path_or_fd: str | int) -> tuple[int, int]:
    st = os.stat(path_or_fd) if isinstance(path_or_fd, str) else os.fstat(path_or_fd)
    return st.st_dev, st.st_ino


# -- native -----------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path: Path) -> Iterator[JobRegistry]:
    root = tmp_path / "cg"
    hier = (Hierarchy("freezer", 1, root / "freezer"),)
    hier[0].mountpoint.mkdir(parents=True)
    reg = JobRegistry(tmp_path / "state", CgroupLayout(hier, "callerid"), node="n2")
    reg.recover()
    yield reg
    reg.close()


@pytest.fixture
def process() -> Iterator[Callable[..., int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*unshare: str) -> int:
        argv = ["unshare", *unshare, "sleep", "60"] if unshare else ["sleep", "60"]
        p = subprocess.Popen(argv)
        started.append(p)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return p.pid

    yield start
    for p in started:
        p.kill()
        p.wait()


@pytest.mark.root
def test_native_a_job_in_its_own_mount_namespace(registry: JobRegistry,
                                                 process: Callable[..., int]) -> None:
    pid = process("-m", "--propagation", "private")
    registry.start("42", "alice")
    registry.attach("42", pid)
    got = registry.namespaces("42")
    try:
        assert [kind for kind, _ in got] == ["mnt"]
        assert ns_id(got[0][1]) == ns_id(f"/proc/{pid}/ns/mnt")
        assert not os.get_inheritable(got[0][1])
    finally:
        jobenv.close_all(got)


@pytest.mark.root
def test_native_a_job_in_the_agents_namespaces_has_none(registry: JobRegistry,
                                                       process: Callable[..., int]) -> None:
    registry.start("42", "alice")
    assert registry.namespaces("42") == []       # no process at all
    registry.attach("42", process())
    assert registry.namespaces("42") == []


def started(registry: JobRegistry, job: str, argv: list[str]) -> int:
    """A job whose main process the registry started (and recorded); its pid, once the
    process has its own mount namespace when argv makes one."""
    registry.start(job, "root", argv)
    rec = registry.get(job)
    assert rec is not None and rec.job.main_pid is not None and rec.main_start is not None
    pid = rec.job.main_pid
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return pid


@pytest.mark.root
@pytest.mark.parametrize("unshare", [True, False])
def test_native_the_recorded_main_process_costs_no_cgroup_read(
        registry: JobRegistry, monkeypatch: pytest.MonkeyPatch, unshare: bool) -> None:
    argv = ["unshare", "-m", "--propagation", "private", "sleep", "60"] if unshare else \
        ["sleep", "60"]
    pid = started(registry, "42", argv)
    try:
        def no_cgroups(*args: object) -> set[int]:
            raise AssertionError("a cgroup was read")

        monkeypatch.setattr(registry.layout, "procs", no_cgroups)
        got = registry.namespaces("42")
        try:
            assert [k for k, _ in got] == (["mnt"] if unshare else [])
            assert [ns_id(fd) for _, fd in got] == (
                [ns_id(f"/proc/{pid}/ns/mnt")] if unshare else [])
        finally:
            jobenv.close_all(got)
    finally:
        os.kill(pid, 9)


@pytest.mark.root
@pytest.mark.parametrize("how", ["attached", "recorded"])
def test_native_a_pid_reused_while_opening_gives_nothing(
        registry: JobRegistry, process: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "attached":
        pid = process("-m", "--propagation", "private")
        registry.start("42", "alice")
        registry.attach("42", pid)
    else:
        pid = started(registry, "42", ["unshare", "-m", "--propagation", "private",
                                       "sleep", "60"])
    real = callerid.proc_start_ticks
    calls = iter([0, 1])

    def other_process_the_second_time(p: int, procfs: str = "/proc") -> int:
        return real(p, procfs) + next(calls)

    monkeypatch.setattr(callerid, "proc_start_ticks", other_process_the_second_time)
    before = open_paths()
    try:
        if how == "recorded":   # the main process gone: the job's end is near
            with pytest.raises(ProcessLookupError, match="went away while its namespaces"):
                registry.namespaces("42")
        else:                   # another of the job's processes: skipped, none left
            assert registry.namespaces("42") == []
        assert open_paths() == before
    finally:
        if how == "recorded":
            os.kill(pid, 9)


@pytest.mark.root
def test_native_processes_that_come_and_go_are_skipped(
        registry: JobRegistry, process: Callable[..., int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job without a main process (`job start`) whose first process exits while it is
    looked at (an adopted login that ends): the next one is taken, not an error."""
    keeper = process("-m", "--propagation", "private")
    registry.start("42", "alice")
    registry.attach("42", keeper)
    monkeypatch.setattr(registry, "pids", lambda job_id: [999_999_999, keeper])
    got = registry.namespaces("42")
    try:
        assert [k for k, _ in got] == ["mnt"]
        assert [ns_id(fd) for _, fd in got] == [ns_id(f"/proc/{keeper}/ns/mnt")]
    finally:
        jobenv.close_all(got)


# -- Slurm ------------------------------------------------------------------------------------

@pytest.fixture
def spool() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="spool", dir="/tmp"))  # sun_path < 108 bytes
    yield d
    shutil.rmtree(d)


def slurm(spool: Path, tmp_path: Path, version: tuple[int, int] = (22, 5)) -> SlurmJobs:
    return SlurmJobs(SlurmNodeConfig(
        nodename="node2", spool_dir=str(spool), prolog_contain=True,
        proctrack="proctrack/cgroup", cgroup_plugin="cgroup/v1", cgroup_prepend="/slurm",
        cgroup_mountpoint=str(tmp_path / "cg"), slurm_user="root", version=version))


@pytest.fixture
def stepd(spool: Path) -> Iterator[Callable[[int], FakeStepd]]:
    made: list[FakeStepd] = []

    def make(version: int) -> FakeStepd:
        fake = FakeStepd(str(spool / f"node2_42.{EXTERN_STEP}"), version=version)
        fake.uid, fake.state = 1001, 2
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


def test_slurm_22_05_job_container_tmpfs_gives_the_mount_namespace(
        spool: Path, tmp_path: Path, stepd: Callable[[int], FakeStepd]) -> None:
    holder = tmp_path / "ns-holder"     # job_container/tmpfs's bind-mounted nsfs file
    holder.write_text("")
    fake = stepd(V22_05)
    fake.ns = [(jobenv.CLONE_FLAGS["mnt"], str(holder))]
    got = slurm(spool, tmp_path).namespaces("42")
    try:
        assert [k for k, _ in got] == ["mnt"] and ns_id(got[0][1]) == ns_id(str(holder))
    finally:
        jobenv.close_all(got)
    assert [op for op, _ in fake.requests if op in (26, 28)] == [26]


def test_slurm_job_container_none_gives_nothing(spool: Path, tmp_path: Path,
                                               stepd: Callable[[int], FakeStepd]) -> None:
    stepd(V22_05).ns = []                 # the stepd answers fd 0: no fd follows
    assert slurm(spool, tmp_path).namespaces("42") == []


def test_slurm_25_11_keeps_what_to_join_in_order_and_closes_the_rest(
        spool: Path, tmp_path: Path, stepd: Callable[[int], FakeStepd]) -> None:
    files = {}
    for kind in ("user", "net", "mnt"):
        files[kind] = tmp_path / kind
        files[kind].write_text(kind)
    fake = stepd(V26_05)
    fake.ns = [(jobenv.CLONE_FLAGS["user"], str(files["user"])),   # never joined
               (jobenv.CLONE_FLAGS["mnt"], str(files["mnt"])),
               (jobenv.CLONE_FLAGS["ipc"], "/proc/self/ns/ipc"),    # the agent's own
               (jobenv.CLONE_FLAGS["net"], str(files["net"]))]
    got = slurm(spool, tmp_path, (26, 5)).namespaces("42")
    try:
        assert [k for k, _ in got] == ["net", "mnt"]       # JOIN_KINDS order
        assert [ns_id(fd) for _, fd in got] == [ns_id(str(files["net"])),
                                                ns_id(str(files["mnt"]))]
        assert str(files["user"]) not in settled_open_paths({str(files["user"])})
    finally:
        jobenv.close_all(got)
    paths = {str(f) for f in files.values()}
    assert not paths & settled_open_paths(paths)


def test_slurm_a_stepd_that_fails_is_an_error_not_nothing(
        spool: Path, tmp_path: Path, stepd: Callable[[int], FakeStepd]) -> None:
    fake = stepd(V22_05)
    fake.ns_failed = True                      # answers -1: the plugin failed
    with pytest.raises(StepdError, match="could not open the job's namespace"):
        slurm(spool, tmp_path).namespaces("42")
    fake.handlers[26] = lambda conn: False     # hangs up
    with pytest.raises(StepdError):
        slurm(spool, tmp_path).namespaces("42")
    with pytest.raises(ProcessLookupError, match="no extern step"):
        slurm(spool, tmp_path).namespaces("43")
