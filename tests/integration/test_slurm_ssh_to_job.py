"""ssh-to-job into Slurm jobs, on real Slurm in the lab (issue 11).

The agents run their Slurm backend; jobs are submitted with sbatch as the lab users. The
CLI runs on node1 while the job runs on node2 only (a node outside the allocation, as a
login node would be), without -name: it asks slurmctld once (squeue) for the job's
BatchHost. The session is enrolled into the job's extern step by slurmstepd
(REQUEST_ADD_EXTERN_PID), so Slurm lists its processes and kills them with the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab as lab_mod
from tests.integration.helpers import Tmux, process_alive
from tests.integration.slurm import (
    KILL_TIMEOUT,
    sbatch_sleep,
    scancel,
    slurm_lab,
    squeue_state,
    uid_of,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    """This module's lab: Slurm and the agents with their Slurm backend."""
    yield from slurm_lab()


@pytest.fixture(scope="module")
def work(shared_dir: Path) -> Path:
    d = shared_dir / "slurm-stj"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    return d


@pytest.fixture(scope="module")
def job(lab: lab_mod.Lab, work: Path) -> Iterator[int]:
    """alice's batch job on node2, submitted from `work` with MYVAR in its environment."""
    job = sbatch_sleep(lab, "alice", "node2", cwd=str(work), env={"MYVAR": "hello world"})
    yield job
    scancel(lab, job)


def stj(lab: lab_mod.Lab, *argv: str, user: str = "alice", node: str = "node1",
        ) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin("ssh-to-job"), *argv], user=user, check=False, timeout=60)
    return r


def listpids(lab: lab_mod.Lab, job: int) -> list[list[str]]:
    out = lab.run("node2", ["scontrol", "listpids", str(job)], check=False).stdout
    return [line.split() for line in out.splitlines()[1:]]


def extern_pids(lab: lab_mod.Lab, job: int) -> set[int]:
    return {int(f[0]) for f in listpids(lab, job) if f[2:3] == ["extern"]}


def session_dirs(lab: lab_mod.Lab) -> list[str]:
    return lab.run("node2", ["sh", "-c", "ls /run/callerid-adopt/sessions 2>/dev/null || true"]
                   ).stdout.split()


@contextlib.contextmanager
def open_session(lab: lab_mod.Lab, job: int) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``ssh-to-job JOB 'echo $$; exec sleep 300'`` from node1 as alice: the client and the
    pid of the session's command; the client is killed after, if still there."""
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), str(job), "echo $$; exec sleep 300"],
                  user="alice", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        yield p, int(p.stdout.readline())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_command_in_the_job_from_a_node_outside_it(
        lab: lab_mod.Lab, job: int, work: Path) -> None:
    """Its exit status, the job's environment and directory, the extern step's cgroup."""
    batch = [int(f[0]) for f in listpids(lab, job) if f[2:3] == ["batch"]]
    r = stj(lab, str(job), 'hostname; pwd; echo "$MYVAR|$SLURM_JOB_ID|$CALLERID_JOB_ID"; '
            'echo "PIDS=$CALLERID_JOB_PIDS"; grep freezer /proc/self/cgroup; exit 3')
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["node2", str(work), f"hello world|{job}|{job}"], r.stdout
    pids = [int(p) for p in lines[3].removeprefix("PIDS=").split()]
    assert pids[0] == min(batch) and set(batch) <= set(pids), (pids, batch)
    assert lines[4].endswith(f"/uid_{uid_of('alice')}/job_{job}/step_extern"), r.stdout
    assert session_dirs(lab) == []


def test_the_session_is_slurms_and_ends_alone(lab: lab_mod.Lab, job: int) -> None:
    """Listed by slurmstepd in the extern step while it runs; when the client goes
    away, the session's processes die and the job runs on."""
    before = extern_pids(lab, job)
    with open_session(lab, job) as (p, pid):
        assert pid in extern_pids(lab, job)
        p.terminate()
        p.wait(30)
        deadline = time.monotonic() + KILL_TIMEOUT
        while (process_alive(pid) or extern_pids(lab, job) - before) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(pid)
        assert extern_pids(lab, job) == before           # sshd and all: gone
        assert squeue_state(lab, job) == "RUNNING"
        assert session_dirs(lab) == []


def test_what_a_command_leaves_running_ends_with_its_session(
        lab: lab_mod.Lab, job: int) -> None:
    """A background process, one after setsid, one after a double fork: none outlives
    the session (the launcher, their subreaper, kills them once sshd exits); the job
    runs on, and what else runs in its extern step is untouched."""
    before = extern_pids(lab, job)
    r = stj(lab, str(job),
            "sleep 300 >/dev/null 2>&1 & echo $!; "
            "setsid sh -c 'sleep 301 >/dev/null 2>&1 & echo $!'; "
            "(sh -c 'sleep 302 >/dev/null 2>&1 & echo $!' &); sleep 0.5")
    assert r.returncode == 0, r.stderr
    left = [int(p) for p in r.stdout.split()]
    assert len(left) == 3, r.stdout
    deadline = time.monotonic() + KILL_TIMEOUT
    while any(process_alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in left if process_alive(p)] == []
    assert extern_pids(lab, job) == before
    assert squeue_state(lab, job) == "RUNNING"


def test_scancel_ends_an_open_session(lab: lab_mod.Lab) -> None:
    job = sbatch_sleep(lab, "alice", "node2")
    try:
        with open_session(lab, job) as (p, pid):
            scancel(lab, job, user="alice")
            p.wait(KILL_TIMEOUT)
            deadline = time.monotonic() + KILL_TIMEOUT
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not process_alive(pid)
            deadline = time.monotonic() + KILL_TIMEOUT
            while session_dirs(lab) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert session_dirs(lab) == []
    finally:
        scancel(lab, job)


def test_an_interactive_shell(lab: lab_mod.Lab, job: int, work: Path,
                              shared_dir: Path) -> None:
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-slurm")
    try:
        t.start(["sh", "-c", '"$@"; echo "STATUS=$?"', "sh", lab.venv_bin("ssh-to-job"),
                 str(job)])
        t.wait(lambda: "$" in t.screen() or "#" in t.screen(), why="a prompt")
        # answers that differ from the typed lines: the echo of a command cannot match
        t.keys('echo "H$((1+1))=$(hostname):$PWD:$SLURM_JOB_ID"', "Enter")
        t.keys('echo "T$((1+1))=$(tty)"', "Enter")
        screen = t.wait(lambda: (lambda s: s if "T2=" in s else "")(t.screen()),
                        why="the last answer")
        assert f"H2=node2:{work}:{job}" in screen, screen
        assert "T2=/dev/pts/" in screen, screen
        t.keys("exit", "Enter")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh-to-job to end")
        assert "STATUS=0" in t.screen(), t.screen()
    finally:
        t.kill()


def test_scp_sftp_rsync_both_ways(lab: lab_mod.Lab, job: int, work: Path,
                                  shared_dir: Path) -> None:
    src = shared_dir / "slurm-stj-src.bin"
    src.write_bytes(bytes(range(256)) * 8192)   # 2 MiB
    src.chmod(0o644)
    out = shared_dir / "slurm-stj-out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    stj_bin = lab.venv_bin("ssh-to-job")
    j = str(job)
    assert stj(lab, "-ssh", "scp", j, str(src), "remote:up.bin").returncode == 0
    assert stj(lab, "-ssh", "scp", j, "remote:up.bin", str(out / "scp.bin")).returncode == 0
    r = lab.run("node1", ["sh", "-c", f"cd {out} && rsync -e {stj_bin} {j}:up.bin rsync.bin"
                          f" && rsync -e {stj_bin} rsync.bin {j}:back.bin"], user="alice",
                check=False)
    assert r.returncode == 0, r.stderr
    r = lab.run("node1", ["sh", "-c", f"echo 'get back.bin {out}/sftp.bin' | "
                          f"{stj_bin} -ssh 'sftp -b -' {j}"], user="alice", check=False)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for name in ("scp.bin", "rsync.bin", "sftp.bin"):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert hashlib.sha256((work / "back.bin").read_bytes()).hexdigest() == digest


def test_another_user_is_refused_in_one_line_with_nothing_started(
        lab: lab_mod.Lab, job: int) -> None:
    before = extern_pids(lab, job)
    r = stj(lab, str(job), "true", user="bob")
    assert r.returncode == 1 and r.stderr.startswith("ssh-to-job: Not found: ") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert extern_pids(lab, job) == before and session_dirs(lab) == []


def test_unknown_and_ended_jobs_are_one_line(lab: lab_mod.Lab) -> None:
    r = stj(lab, "999999", "true")
    assert (r.returncode, r.stderr) == (1, "ssh-to-job: Not found: no job 999999 in Slurm\n")
    ended = sbatch_sleep(lab, "alice", "node2")
    scancel(lab, ended)
    r = stj(lab, str(ended), "true")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and \
        r.stderr.startswith("ssh-to-job: N"), r.stderr   # Not found / Not running


def test_name_reaches_another_node_of_the_allocation(lab: lab_mod.Lab) -> None:
    out = lab.run("node1", ["sbatch", "--parsable", "-N", "2", "-w", "node1,node2",
                            "-o", "/dev/null", "--wrap", "sleep 300"],
                  user="alice", cwd="/tmp").stdout
    job = int(out.strip().split(";")[0])
    try:
        deadline = time.monotonic() + 30
        while squeue_state(lab, job) != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stj(lab, str(job), "hostname", node="node2").stdout.strip() == "node1"
        r = stj(lab, "-name", "node2", str(job), "hostname")
        assert r.stdout.strip() == "node2", r.stderr
    finally:
        scancel(lab, job)


def test_ssh_job_from_a_node_outside_it(lab: lab_mod.Lab, job: int, shared_dir: Path) -> None:
    """`ssh job.ID` with the printed block (tests/integration/test_ssh_job_proxy.py has
    the rest): the proxy finds the Slurm job's node as ssh-to-job does (one squeue)."""
    keys = shared_dir / "slurm-prx-keys"
    r = stj(lab, "-ssh-config", "-ssh-dir", str(keys))
    assert r.returncode == 0, r.stderr
    config = shared_dir / "slurm-prx-config"
    config.write_text(r.stdout)
    config.chmod(0o644)
    r = lab.run("node1", ["ssh", "-F", str(config), f"job.{job}",
                          "hostname; echo $CALLERID_JOB_ID"], user="alice", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["node2", str(job)]
    assert (keys / "known_hosts").read_text() == ""
    r = stj(lab, "-ssh-config", "-ssh-dir", str(shared_dir / "slurm-prx-keys-bob"), user="bob")
    bobs = shared_dir / "slurm-prx-config-bob"
    bobs.write_text(r.stdout)
    bobs.chmod(0o644)
    r = lab.run("node1", ["ssh", "-F", str(bobs), f"job.{job}", "true"], user="bob",
                check=False)
    ours = [line for line in r.stderr.splitlines() if line.startswith("ssh-to-job: ")]
    assert r.returncode == 255 and len(ours) == 1, r.stderr
    assert ours[0].startswith(f"ssh-to-job: Not found: no job {job} on ") and \
        ours[0].endswith(" (or not yours)"), ours


# -- condor_ssh_to_job's habits (issue 12 item 3) ------------------------------------------

def test_cluster_proc_0_is_the_slurm_job_and_another_proc_is_one_line(
        lab: lab_mod.Lab, job: int) -> None:
    r = stj(lab, f"{job}.0", 'echo "$SLURM_JOB_ID"')
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{job}\n", ""), r.stderr
    before = extern_pids(lab, job)
    r = stj(lab, f"{job}.1", "true")
    assert r.returncode == 2 and r.stderr == (
        f"ssh-to-job: Usage: invalid job id '{job}.1': Slurm job ids are plain numbers: "
        f"CLUSTER.PROC means job CLUSTER only when PROC is 0 ({job}.0 is job {job}; "
        f"{job}.1 is no job)\n")
    assert extern_pids(lab, job) == before


def test_remove_on_interrupt_is_refused_before_a_session_opens(
        lab: lab_mod.Lab, job: int) -> None:
    """Slurm ends its jobs, the agent does not: one line, before any sshd starts."""
    before = extern_pids(lab, job)
    r = stj(lab, "-remove-on-interrupt", str(job), "echo should-not-run")
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    assert r.stderr == ("ssh-to-job: Not supported: -remove-on-interrupt: jobs on node2 are "
                        "ended by their scheduler, not by the agent (end job "
                        f"{job} with the scheduler, e.g. scancel)\n")
    assert extern_pids(lab, job) == before and session_dirs(lab) == []
    assert squeue_state(lab, job) == "RUNNING"


def test_an_interactive_shell_is_greeted_with_the_jobs_pids(
        lab: lab_mod.Lab, job: int, shared_dir: Path) -> None:
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-slurm-greet")
    try:
        t.start(["sh", "-c", '"$@"; echo "STATUS=$?"', "sh", lab.venv_bin("ssh-to-job"),
                 str(job)])
        screen = t.wait(lambda: (lambda s: s if "Your job" in s else "")(t.screen()),
                        why="the greeting")
        lines = screen.splitlines()
        i = lines.index("Welcome to node2!")
        prefix = f"Your job {job} is running with pid(s) "
        assert lines[i + 1].startswith(prefix) and lines[i + 1].endswith("."), lines[i + 1]
        pids = {int(p) for p in lines[i + 1][len(prefix):-1].split()}
        assert pids and pids <= {int(f[0]) for f in listpids(lab, job)}, (pids, lines)
        t.keys("exit", "Enter")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh-to-job to end")
    finally:
        t.kill()
