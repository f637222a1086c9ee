"""node_agent.jobs.slurm: Slurm's jobs from fake slurmstepd sockets in a fake spool dir
(the fake speaks the stepd protocol byte for byte: tests/unit/fakes.py FakeStepd)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from callerid import CgroupError, ProcCgroup
from node_agent.agent.admission import Admission, Peer
from node_agent.config import AgentConfig, SlurmConfig
from node_agent.errors import JobNotFound, NotSupported, StartupError
from node_agent.jobs import JobBackend, JobControl, open_backend
from node_agent.jobs.slurm import SlurmJobs
from node_agent.jobs.slurmconf import BATCH_STEP, EXTERN_STEP, SlurmNodeConfig
from node_agent.jobs.stepd import StepdRefused
from node_agent.pamcontract import Request
from tests.unit.fakes import V22_05, FakeStepd

USERS = {1001: "alice", 1002: "bob"}
PEER = Peer(pid=4321, uid=0, gid=0)


@pytest.fixture
def spool() -> Iterator[Path]:
    """A short path: socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="spool", dir="/tmp"))
    yield d
    shutil.rmtree(d)


@pytest.fixture(autouse=True)
def users(monkeypatch: pytest.MonkeyPatch) -> None:
    def getpwuid(uid: int) -> pwd.struct_passwd:
        if uid not in USERS:
            raise KeyError(uid)
        return pwd.struct_passwd((USERS[uid], "x", uid, uid, "", "/", "/bin/sh"))

    monkeypatch.setattr("node_agent.jobs.slurm.pwd.getpwuid", getpwuid)


def config(spool: Path, tmp_path: Path, **kw: object) -> SlurmNodeConfig:
    fields: dict[str, object] = dict(
        nodename="node2", spool_dir=str(spool), prolog_contain=True,
        proctrack="proctrack/cgroup", cgroup_plugin="cgroup/v1", cgroup_prepend="/slurm",
        cgroup_mountpoint=str(tmp_path / "cg"), slurm_user="root", version=(22, 5))
    fields.update(kw)
    return SlurmNodeConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def stepds(spool: Path) -> Iterator[Callable[..., FakeStepd]]:
    made: list[FakeStepd] = []

    def make(job: int, step: int, *, uid: int = 1001, pids: tuple[int, ...] = (),
             state: int = 2, node: str = "node2") -> FakeStepd:
        fake = FakeStepd(str(spool / f"{node}_{job}.{step}"), version=V22_05)
        fake.uid, fake.pids, fake.state = uid, list(pids), state
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


def test_a_backend_that_leaves_jobs_to_slurm(spool: Path, tmp_path: Path) -> None:
    jobs: JobBackend = SlurmJobs(config(spool, tmp_path))
    assert jobs.node == "node2"
    assert not isinstance(jobs, JobControl)


def test_the_jobs_are_those_with_an_extern_step(spool: Path, tmp_path: Path,
                                                stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP, uid=1001)
    stepds(43, EXTERN_STEP, uid=1002)
    stepds(44, BATCH_STEP, uid=1001)          # no extern step: cannot be joined
    stepds(45, EXTERN_STEP, uid=1001, node="node3")   # another slurmd's socket
    (spool / "job00042").mkdir()              # the spool dir's other entries
    jobs = SlurmJobs(config(spool, tmp_path))
    assert [(r.job.id, r.job.user, r.job.uid, r.state) for r in jobs.list_jobs()] == \
        [("42", "alice", 1001, "running"), ("43", "bob", 1002, "running")]
    assert [r.job.id for r in jobs.list_jobs("bob")] == ["43"]
    rec = jobs.get("42")
    assert rec is not None and rec.job.user == "alice"
    assert jobs.get("44") is None and jobs.get("99") is None and jobs.get("x") is None


@pytest.mark.parametrize(("state", "ours"), [(1, "starting"), (2, "running"), (3, "ending"),
                                             (0, "ending")])
def test_states_on_22_05(spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd],
                         state: int, ours: str) -> None:
    stepds(42, EXTERN_STEP, state=state)
    rec = SlurmJobs(config(spool, tmp_path)).get("42")
    assert rec is not None and rec.state == ours


def test_no_spool_dir_means_no_jobs(tmp_path: Path) -> None:
    jobs = SlurmJobs(config(tmp_path / "missing", tmp_path))
    assert jobs.list_jobs() == [] and jobs.get("42") is None


def test_pids_batch_step_first(spool: Path, tmp_path: Path,
                               stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP, pids=(300, 301))
    stepds(42, BATCH_STEP, pids=(200, 201))
    stepds(42, 0, pids=(400, 201))
    assert SlurmJobs(config(spool, tmp_path)).pids("42") == [200, 201, 400, 300, 301]


def test_the_main_process_is_the_first_that_is_no_sshd(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd]) -> None:
    proc = tmp_path / "proc"
    for pid, comm, env in ((300, "sshd", b"SSH_X=1\0"), (301, "bash", b"HOME=/h\0A=b\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / str(pid) / "environ").write_bytes(env)
    stepds(42, EXTERN_STEP, pids=(300, 301))
    jobs = SlurmJobs(config(spool, tmp_path), procfs=str(proc))
    assert jobs.main_pid("42") == 301
    assert jobs.environment("42") == {"HOME": "/h", "A": "b", "SLURM_JOB_ID": "42"}


def test_adoption_asks_the_extern_stepd(spool: Path, tmp_path: Path,
                                        stepds: Callable[..., FakeStepd]) -> None:
    ext = stepds(42, EXTERN_STEP)
    batch = stepds(42, BATCH_STEP)
    SlurmJobs(config(spool, tmp_path)).adopt("42", 4321)
    assert (22, 4321) in ext.requests
    assert not any(op == 22 for op, _ in batch.requests)


def test_a_refused_adoption_raises(spool: Path, tmp_path: Path,
                                   stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP).extern_rc = -1
    with pytest.raises(StepdRefused):
        SlurmJobs(config(spool, tmp_path)).adopt("42", 4321)


def test_admission_adopts_through_slurmstepd(spool: Path, tmp_path: Path,
                                             stepds: Callable[..., FakeStepd]) -> None:
    ext = stepds(42, EXTERN_STEP, uid=1001)
    r = Admission(SlurmJobs(config(spool, tmp_path)), lambda *a: None).decide(
        Request(user="alice", service="sshd", rhost="10.0.0.1",
                ssh_connection="10.0.0.1 40000 10.0.0.2 22"), PEER)
    assert (r.decision, r.reason, r.job_id) == ("ALLOW", "one-job", "42")
    assert (22, PEER.pid) in ext.requests


def test_without_prolog_contain_the_agent_says_why(spool: Path, tmp_path: Path) -> None:
    jobs = SlurmJobs(config(spool, tmp_path, prolog_contain=False))
    assert "PrologFlags=contain" in jobs.why_no_jobs()
    assert SlurmJobs(config(spool, tmp_path)).why_no_jobs() == ""
    with pytest.raises(ValueError, match="no extern step on node2 .*PrologFlags=contain"):
        jobs.adopt("42", 1)


def test_caller_id_maps_a_process_s_cgroup_to_the_job(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP)
    jobs = SlurmJobs(config(spool, tmp_path))
    batch = ProcCgroup(4, ("freezer",), "/slurm/uid_1001/job_42/step_batch")
    other = ProcCgroup(4, ("freezer",), "/slurm/uid_1001/job_77/step_0")
    unified = ProcCgroup(0, (), "/user.slice")
    assert jobs.job_for_proc_cgroups([unified, batch]) == "42"   # not only step_extern
    assert jobs.job_for_proc_cgroups([other]) is None            # not a job of this node
    assert jobs.job_for_cgroup_id(12345) is None


def test_newest_follows_the_versions_rule(spool: Path, tmp_path: Path,
                                          stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP)
    stepds(43, EXTERN_STEP)
    # 22.05 on cgroup v1: the latest mtime of the job's cgroup directory
    v1 = SlurmJobs(config(spool, tmp_path))
    for job, when, prepend in (("42", 2000.0, "slurm_node2"), ("43", 1000.0, "slurm")):
        d = tmp_path / "cg" / "freezer" / prepend / "uid_1001" / f"job_{job}"
        d.mkdir(parents=True)
        os.utime(d, (when, when))
    assert v1.newest(v1.list_jobs()).job.id == "42"
    # 22.05 on cgroup v2: the highest job id
    v2 = SlurmJobs(config(spool, tmp_path, cgroup_plugin="cgroup/v2"))
    assert v2.newest(v2.list_jobs()).job.id == "43"


def _tree(root: int) -> list[int]:
    """Every process whose parent chain or session leads to `root` (found in /proc)."""
    stat = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2:].split()
            stat[int(entry)] = (int(fields[1]), int(fields[3]))
    out = {root}
    changed = True
    while changed:
        more = {p for p, (ppid, sid) in stat.items() if ppid in out or sid in out}
        changed = not more <= out
        out |= more
    return sorted(out)


def test_a_session_is_its_launchers_tree_in_the_extern_step(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd]) -> None:
    """Enrolled with REQUEST_ADD_EXTERN_PID; its processes: the launcher's tree, and what
    left it within the launcher's process session (a double fork); not the rest of the
    extern step; a pid that is no longer the launcher (its start time differs) is none."""
    ext = stepds(42, EXTERN_STEP)
    stepds(42, BATCH_STEP)
    launcher = subprocess.Popen(
        ["sh", "-c", "sleep 300 & setsid sleep 300 & (sleep 300 &); echo up; wait"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(["sleep", "300"])   # an adopted login's, say
    try:
        assert launcher.stdout is not None and launcher.stdout.readline() == "up\n"
        deadline = time.monotonic() + 10
        while len(tree := _tree(launcher.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree) == 4, tree
        ext.pids = [*tree, other.pid]
        jobs = SlurmJobs(config(spool, tmp_path))
        cg, others = jobs.session_cgroup("42", "abc"), jobs.session_cgroup("42", "def")
        assert cg.create() == [] and not cg.exists()
        with pytest.raises(CgroupError):
            cg.join()              # not open yet
        cg.enroll(launcher.pid)
        assert (22, launcher.pid) in ext.requests
        assert cg.procs() == set(tree) and others.procs() == set()
        assert jobs.session_cgroup("42").procs() == set(tree)
        assert cg.join() == []
        # the same pid with another start time: not the launcher any more
        jobs.set_session_root("42", "abc", (launcher.pid, 1))
        assert cg.procs() == set()
        cg.enroll(launcher.pid)
        assert cg.kill(timeout=10) == 4
        assert launcher.wait(10) == -signal.SIGKILL and other.poll() is None
        cg.remove()
        assert jobs.session_roots("42", None) == []
    finally:
        for p in _tree(launcher.pid) if launcher.poll() is None else []:
            os.kill(p, signal.SIGKILL)
        other.kill()
        other.wait()
        launcher.wait()


def test_no_session_without_the_jobs_extern_step(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, BATCH_STEP)
    jobs = SlurmJobs(config(spool, tmp_path))
    with pytest.raises(JobNotFound):
        jobs.session_cgroup("42", "abc").create()
    with pytest.raises(JobNotFound):
        jobs.session_cgroup("43", "abc").create()


def test_a_refused_enrollment_records_no_session(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd]) -> None:
    stepds(42, EXTERN_STEP).extern_rc = -1
    jobs = SlurmJobs(config(spool, tmp_path))
    with pytest.raises(StepdRefused):
        jobs.session_cgroup("42", "abc").enroll(os.getpid())
    assert jobs.session_roots("42", None) == []


def test_no_cgroups_outside_the_jobs(spool: Path, tmp_path: Path) -> None:
    jobs = SlurmJobs(config(spool, tmp_path))
    helper = jobs.helper_cgroup("abc")
    assert not helper.exists() and helper.procs() == set()
    with pytest.raises(NotSupported):
        helper.create()
    assert jobs.leftover_helper_cgroups() == [] and jobs.scratch_cgroups() is None
    assert SlurmJobs(config(spool, tmp_path), scratch="/cg/callerid").scratch_cgroups() == \
        "/cg/callerid"


def test_open_backend_reads_slurm_conf(tmp_path: Path, spool: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=lab\nSlurmdSpoolDir=/var/spool/slurmd/%n\n"
                    "PrologFlags=Contain\nProctrackType=proctrack/cgroup\n"
                    "NodeName=node[1-2] CPUs=2\n")
    (tmp_path / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
    base = AgentConfig(backend="slurm", procfs=str(tmp_path / "proc"),
                       slurm=SlurmConfig(slurm_conf=str(conf), nodename="node2"))
    jobs = open_backend(base)
    assert isinstance(jobs, SlurmJobs)
    assert (jobs.node, jobs.cfg.spool_dir, jobs.cfg.prolog_contain) == \
        ("node2", "/var/spool/slurmd/node2", True)
    moved = open_backend(replace(base, slurm=replace(base.slurm, spool_dir=str(spool))))
    assert isinstance(moved, SlurmJobs) and moved.cfg.spool_dir == str(spool)


def test_open_backend_without_slurm_conf_is_a_startup_error(tmp_path: Path) -> None:
    cfg = AgentConfig(backend="slurm",
                      slurm=SlurmConfig(slurm_conf=str(tmp_path / "none.conf")))
    with pytest.raises(StartupError, match="Slurm backend: .*none.conf"):
        open_backend(cfg)


def test_a_spool_dir_others_can_write_is_not_trusted(
        spool: Path, tmp_path: Path, stepds: Callable[..., FakeStepd],
        caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who can create a socket in the spool dir could claim a job of anyone."""
    stepds(42, EXTERN_STEP)
    jobs = SlurmJobs(config(spool, tmp_path))
    assert [r.job.id for r in jobs.list_jobs()] == ["42"]
    os.chmod(spool, 0o777)
    assert jobs.list_jobs() == [] and jobs.get("42") is None
    assert "is not root's alone" in caplog.text
    os.chmod(spool, 0o755)
    assert [r.job.id for r in jobs.list_jobs()] == ["42"]


def test_owners_of_gone_sockets_are_forgotten(spool: Path, tmp_path: Path,
                                              stepds: Callable[..., FakeStepd]) -> None:
    first = stepds(42, EXTERN_STEP)
    jobs = SlurmJobs(config(spool, tmp_path))
    assert jobs.get("42") is not None and len(jobs._uids) == 1
    first.stop()
    os.unlink(first.path)
    assert jobs.list_jobs() == [] and jobs._uids == {}
