"""ssh-to-job under attack by an ordinary user (alice), in the lab: real sshd, munged, cgroups.

- A job that bind-mounts its own ``shutil.py`` over the standard library's in its own mount
  namespace (``unshare -Urm``, no privilege needed) and hides /run, so that a session's
  files are made, and removed, by the agent's launcher in the job's view: the job's code
  never runs in the agent's helper, and no process of alice's is left outside a job's
  cgroups, whether the session ends first or the job does.
- Another user's job is answered exactly like a missing one.
- The client's shells are never looked at by the agent (root): a root-only one listed first
  is skipped as in any login of alice's.
- A session directory is root's; the user can add nothing to it, also after ``kill -9`` of
  the agent, and the next agent removes it and the session's cgroup leaf.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, node_sh, process_alive
from tests.integration.helpers import start_sleeping_job as start_job

pytestmark = pytest.mark.root

STDLIB = sysconfig.get_paths()["stdlib"]   # the agent's python is the venv's, this one
SLEEP = "exec /bin/sleep 1000000"
SESSIONS = "/run/callerid-adopt/sessions"


def stj(lab: Any, *argv: str, user: str = "alice") -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lab.run(
        "node1", [lab.venv_bin("ssh-to-job"), *argv], user=user, check=False, timeout=60)
    return result






def strays(lab: Any, user: str = "alice") -> list[str]:
    """Processes of *user* in this lab's cgroups but in no job's: "pid cgroup cmdline"."""
    uid = pwd.getpwnam(user).pw_uid
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cgroups = Path(f"/proc/{entry}/cgroup").read_text().splitlines()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue    # Race: exited meanwhile
        ruid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        ours = [c.split(":", 2)[2] for c in cgroups if f":/{lab.name}/" in c]
        if ruid == uid and ours and not all("/callerid/job_" in c for c in ours) and \
                process_alive(int(entry)):
            out.append(f"{entry} {ours[0]} {cmd}")
    return out


def wait_sessions_ended(lab: Any, mark: int, timeout: float = 15.0) -> str:
    """node1's agent log since *mark*, once every session opened there was logged ended."""
    deadline = time.monotonic() + timeout
    while True:
        text: str = lab.agent_log("node1")[mark:]
        opened = set(re.findall(r"opened session (\w+)", text))
        if opened <= set(re.findall(r"session (\w+) ended", text)) or \
                time.monotonic() > deadline:
            assert opened <= set(re.findall(r"session (\w+) ended", text)), text[-3000:]
            return text
        time.sleep(0.1)


# -- the hostile shutil.py -------------------------------------------------------------------

@pytest.fixture
def hostile(lab: Any, shared_dir: Path) -> Iterator[dict[str, Any]]:
    """How to start a hostile job: its own user and mount namespace, a private /run (so a
    session's files go to the node's /tmp, through the launcher), and
    deploy/lab/progs/hostile_shutil.py over the standard library's shutil.py. Its records
    (one file per process that ran it) go to ``out``."""
    out = shared_dir / "hostile-out"
    out.mkdir(exist_ok=True)
    out.chmod(0o1777)
    jobs: list[str] = []

    def start(job_id: str) -> int:
        script = (f"/bin/mount -t tmpfs none /run && echo {out} >/run/hostile-out && "
                  f"/bin/mount --bind {shared_dir}/hostile_shutil.py {STDLIB}/shutil.py && "
                  f"{SLEEP}")
        jobs.append(job_id)
        pid = start_job(lab, job_id, ["/usr/bin/unshare", "-Urm", "/bin/sh", "-c", script])
        # The trap is set: in the job's view, the standard library's shutil is the job's.
        assert "A hostile job's shutil.py" in node_sh(
            lab, f"head -3 /proc/{pid}/root{STDLIB}/shutil.py")
        run = node_sh(lab, f"ls -A /proc/{pid}/root/run").split()   # (mount adds mount/)
        assert "hostile-out" in run and "callerid-adopt" not in run, run
        return pid

    yield {"start": start, "out": out}
    for job_id in jobs:
        adoptctl(lab, "node1", "job", "end", job_id, check=False)


def records(out: Path) -> list[str]:
    return [f.read_text() for f in sorted(out.glob("hostile-*"))]


def helper_cgroups_left(lab: Any) -> list[str]:
    """Transient clean-up cgroups of node1's agent that are still there."""
    return node_sh(lab, "ls -d /sys/fs/cgroup/*/callerid/ssh-to-job-cleanup/job_* "
                        "2>/dev/null; true").split()


def test_hostile_shutil_never_runs_when_the_session_ends_first(
        lab: Any, hostile: dict[str, Any]) -> None:
    job = "hostile1"
    mark = len(lab.agent_log("node1"))
    pid = hostile["start"](job)
    r = stj(lab, job, 'echo "$CALLERID_JOB_ID"; ls -d /tmp/hostile1-*')
    assert r.returncode == 0, r.stderr
    log = wait_sessions_ended(lab, mark)
    sid = re.findall(r"opened session (\w+)", log)[-1]
    assert r.stdout.split()[0] == job and f"/tmp/{job}-{sid}" in r.stdout.split(), r.stdout
    gone = node_sh(lab, f"ls -d /proc/{pid}/root/tmp/{job}-{sid} 2>/dev/null; true") == ""
    adoptctl(lab, "node1", "job", "end", job)
    assert strays(lab) == []
    assert records(hostile["out"]) == []
    assert gone   # the session's files, made in the job's view (the node's /tmp)
    # where the clean-up ran: the session's own cgroup, the job still running
    assert re.search(r"removed by a clean-up helper in \S+/callerid/job_hostile1/ssh-to-job/"
                     r"[0-9a-f]{16}\n", log), log[-3000:]


def test_hostile_shutil_never_runs_when_the_job_ends_first(
        lab: Any, hostile: dict[str, Any]) -> None:
    """The job's cgroups are gone when the session's files are removed: the helper runs in
    a transient cgroup of the agent's, removed after it."""
    job = "hostile2"
    mark = len(lab.agent_log("node1"))
    hostile["start"](job)
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), job, f"echo up; {SLEEP}"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        sid = re.findall(r"opened session (\w+)", lab.agent_log("node1")[mark:])[-1]
        assert node_sh(lab, f"ls -d /tmp/{job}-{sid}").strip()
        adoptctl(lab, "node1", "job", "end", job)
        assert p.wait(timeout=30) != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    log = wait_sessions_ended(lab, mark)
    assert strays(lab) == []
    assert records(hostile["out"]) == []
    assert node_sh(lab, f"ls -d /tmp/{job}-{sid} 2>/dev/null; true") == ""
    assert job not in adoptctl(lab, "node1", "jobs").stdout
    # where the clean-up ran: a transient cgroup (the job's were gone), removed after it
    assert re.search(r"removed by a clean-up helper in \S+/callerid/ssh-to-job-cleanup/"
                     r"job_[0-9a-f]{16}/remove\n", log), log[-3000:]
    assert helper_cgroups_left(lab) == []


# -- another user's job ----------------------------------------------------------------------

@pytest.fixture
def bobs_job(lab: Any) -> Iterator[str]:
    start_job(lab, "b8", ["/bin/sh", "-c", SLEEP], user="bob")
    yield "b8"
    adoptctl(lab, "node1", "job", "end", "b8", check=False)


def test_another_users_job_is_answered_as_a_missing_one(lab: Any, bobs_job: str,
                                                        shared_dir: Path) -> None:
    mark = len(lab.agent_log("node1"))
    probe = [lab.venv_bin("python"), str(shared_dir / "open_job_shell.py"), "node1"]
    bobs = lab.run("node1", [*probe, bobs_job], user="alice").stdout.strip()
    missing = lab.run("node1", [*probe, "zz"], user="alice").stdout.strip()
    assert bobs == f"NOT_FOUND: no job {bobs_job} on node1", bobs
    assert missing == "NOT_FOUND: no job zz on node1", missing
    # what ssh-to-job says, located or asked directly
    for argv in ([], ["-name", "node1"]):
        r_bob, r_zz = (stj(lab, *argv, j, "true") for j in (bobs_job, "zz"))
        assert (r_bob.returncode, r_zz.returncode) == (1, 1)
        assert r_bob.stderr.replace(bobs_job, "ID") == r_zz.stderr.replace("zz", "ID"), \
            (r_bob.stderr, r_zz.stderr)
        assert len(r_bob.stderr.splitlines()) == 1, r_bob.stderr
    alice = pwd.getpwnam("alice").pw_uid
    log = lab.agent_log("node1")[mark:]
    assert f"SECURITY: uid {alice} asked node1 for a shell in job {bobs_job}" in log, log
    assert lab.run("node1", [*probe, bobs_job], user="bob").stdout.strip() == "OPENED"


# -- the client's shells ---------------------------------------------------------------------

@pytest.fixture
def plain_job(lab: Any) -> Iterator[str]:
    job = "plain1"
    start_job(lab, job, ["/bin/sh", "-c", SLEEP])
    yield job
    adoptctl(lab, "node1", "job", "end", job, check=False)


def test_shells_are_picked_by_the_session_as_the_user(lab: Any, plain_job: str,
                                                      shared_dir: Path) -> None:
    """A root-only executable listed first: the agent (root) used to pick it, and the
    session then failed for alice, which told her it exists. Now the session, as alice,
    skips it as it skips a missing one."""
    hidden = shared_dir / "root-only"
    hidden.mkdir(mode=0o700, exist_ok=True)
    node_sh(lab, f"cp /bin/sh {hidden}/sh && chmod 755 {hidden}/sh")
    for first in (f"{hidden}/sh", "/no/such/shell"):
        r = stj(lab, "-shells", f"{first},/bin/bash", plain_job, 'echo "$SHELL"')
        assert (r.returncode, r.stdout.strip()) == (0, "/bin/bash"), r.stderr
    r = stj(lab, "-shells", "bash", plain_job, "true")   # refused before anything starts
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "ssh-to-job: Usage: -shells: 'bash' is not an absolute path of plain names (A-Z a-z "
        "0-9 _ . + - between slashes, no . or .., at most 256 characters)"], r.stderr


# -- session directories -----------------------------------------------------------------

def session_dir(lab: Any, job: str) -> str:
    found = node_sh(lab, f"ls -d {SESSIONS}/{job}-* 2>/dev/null; true").split()
    assert len(found) == 1, found
    return found[0]


def cannot_add_anything(lab: Any, d: str) -> None:
    """alice can neither create, nor rename, nor remove anything in d."""
    for cmd in (f"touch {d}/mine", f"mkdir {d}/mine", f"mv {d}/sshd.log {d}/moved",
                f"rm -f {d}/environment", f"ln -s /tmp {d}/mine"):
        r = lab.run("node1", ["sh", "-c", cmd], user="alice", check=False)
        assert r.returncode != 0, (cmd, r.stdout, r.stderr)
    st = node_sh(lab, f"stat -c '%U %a' {d}").split()
    assert st == ["root", "711"], st


def test_agent_killed_mid_session_leaves_nothing_for_the_next_one(
        lab: Any, plain_job: str) -> None:
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), plain_job, f"echo up; {SLEEP}"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        d = session_dir(lab, plain_job)
        sid = d.rsplit("-", 1)[1]
        leaf = f"/sys/fs/cgroup/*/callerid/job_{plain_job}/ssh-to-job/{sid}"
        pids = {int(x) for x in node_sh(lab, f"cat {leaf}/cgroup.procs").split()}
        assert pids                       # sshd, the shell's sleep
        cannot_add_anything(lab, d)
        lab.agent_stop("node1", signal.SIGKILL)
        cannot_add_anything(lab, d)       # nobody is left to remove it, and still root's
    finally:
        if p.poll() is None:
            p.kill()   # ours to stop: its agent is gone
            p.wait()
    mark = len(lab.agent_log("node1"))
    lab.agent_start("node1")
    assert node_sh(lab, f"ls -A {SESSIONS}") == ""
    assert node_sh(lab, f"ls -d {leaf} 2>/dev/null; true") == ""
    assert [pid for pid in pids if process_alive(pid)] == []
    assert "removed what sessions of an earlier run left: 1 session directories, " \
        "the sessions of 1 jobs" in lab.agent_log("node1")[mark:]
    assert plain_job in adoptctl(lab, "node1", "jobs").stdout       # the job itself runs on
    r = stj(lab, plain_job, "echo again")
    assert (r.returncode, r.stdout.strip()) == (0, "again"), r.stderr


def test_job_end_takes_the_session_directory(lab: Any, shared_dir: Path) -> None:
    job = "plain2"
    start_job(lab, job, ["/bin/sh", "-c", SLEEP])
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), job, f"echo up; {SLEEP}"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        d = session_dir(lab, job)
        cannot_add_anything(lab, d)
        adoptctl(lab, "node1", "job", "end", job)
        assert p.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while node_sh(lab, f"ls -d {d} 2>/dev/null; true") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node_sh(lab, f"ls -d {d} 2>/dev/null; true") == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        adoptctl(lab, "node1", "job", "end", job, check=False)
