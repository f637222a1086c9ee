"""ssh-to-job into jobs that live in namespaces of their own (real sshd, munged, cgroups).

The jobs are alice's own doing, as a job container's: the main process is
``unshare -Urm`` (a user namespace, so no privilege is involved) that mounts a private tmpfs
over /run, and for one job over /tmp too, then execs sleep. The agent's session directory
(/run/callerid-adopt/sessions/...) is then not visible in the job's mount namespace, so the
launcher makes the session's files, as alice, inside the job's view (node_agent/agent/sessions.py):
in /tmp when the job's /tmp is the node's, in the job's private /tmp otherwise. A third job
has only its own network namespace (``unshare -Urn``) and keeps the simple path.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, node_sh
from tests.integration.helpers import start_sleeping_job as start_job

pytestmark = pytest.mark.root

PRIVATE_RUN = "nsw-run"     # tmpfs over /run: the session's files go to the node's /tmp
PRIVATE_TMP = "nsw-tmp"     # tmpfs over /run and /tmp: they go to the job's own /tmp
OWN_NET = "nsw-net"         # own network namespace only
SLEEP = "exec /bin/sleep 1000000"



def session_cgroup(job_id: str) -> re.Pattern[str]:
    """The v2 line of a process in one of the job's ssh-to-job sessions."""
    return re.compile(rf"0::/callerid/job_{re.escape(job_id)}/ssh-to-job/[0-9a-f]{{16}}")

def stj(lab: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lab.run(
        "node1", [lab.venv_bin("ssh-to-job"), *argv], user="alice", check=False, timeout=60)
    return result




def leftovers(lab: Any, job_id: str, main_pid: int | None = None) -> list[str]:
    """Session directories of job_id: the agent's, in node1's /tmp and, while the job
    runs, in the job's own view of /tmp and /run."""
    where = ["/run/callerid-adopt/sessions/*", f"/tmp/{job_id}-*"]
    if main_pid is not None:
        where += [f"/proc/{main_pid}/root/tmp/{job_id}-*",
                  f"/proc/{main_pid}/root/run/callerid-adopt/sessions/*"]
    return node_sh(lab, f"for p in {' '.join(where)}; do [ -e \"$p\" ] && echo \"$p\"; "
                        "done; true").split()




def ns_of(lab: Any, pid: int | str, kind: str) -> str:
    return node_sh(lab, f"readlink /proc/{pid}/ns/{kind}").strip()


@pytest.fixture(scope="module")
def private_run(lab: Any, shared_dir: Path) -> Iterator[dict[str, Any]]:
    work = shared_dir / "nsw-work"
    work.mkdir()
    work.chmod(0o777)
    pid = start_job(lab, PRIVATE_RUN, ["/usr/bin/unshare", "-Urm", "/bin/sh", "-c",
                                       f"/bin/mount -t tmpfs none /run && {SLEEP}"],
                    "--cwd", str(work))
    yield {"work": work, "main_pid": pid}
    adoptctl(lab, "node1", "job", "end", PRIVATE_RUN, check=False)


def test_the_job_really_hides_the_session_directory(lab: Any,
                                                    private_run: dict[str, Any]) -> None:
    pid = private_run["main_pid"]
    assert ns_of(lab, pid, "mnt") != ns_of(lab, "self", "mnt")
    assert node_sh(lab, f"ls -A /proc/{pid}/root/run").split() == []
    assert node_sh(lab, "test -d /run/callerid-adopt && echo yes").strip() == "yes"


def test_command_lands_in_the_jobs_cgroup_and_mount_namespace(
        lab: Any, private_run: dict[str, Any]) -> None:
    r = stj(lab, PRIVATE_RUN, "cat /proc/self/cgroup; readlink /proc/self/ns/mnt; pwd; "
            "echo $CALLERID_JOB_ID; ls -A /run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(session_cgroup(PRIVATE_RUN).fullmatch(line) for line in lines), lines
    assert ns_of(lab, private_run["main_pid"], "mnt") in lines
    assert lines[-2:] == [str(private_run["work"]), PRIVATE_RUN]   # ls: /run is empty
    assert leftovers(lab, PRIVATE_RUN, private_run["main_pid"]) == []


def test_scp_both_ways(lab: Any, private_run: dict[str, Any], shared_dir: Path) -> None:
    src = shared_dir / "nsw-src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    src.chmod(0o644)
    down = shared_dir / "nsw-down"
    down.mkdir()
    down.chmod(0o777)
    r = stj(lab, "-ssh", "scp", PRIVATE_RUN, str(src), "remote:up.bin")
    assert r.returncode == 0, r.stderr
    r = stj(lab, "-ssh", "scp", PRIVATE_RUN, "remote:up.bin", str(down / "down.bin"))
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for f in (private_run["work"] / "up.bin", down / "down.bin"):
        assert hashlib.sha256(f.read_bytes()).hexdigest() == digest, f
    assert leftovers(lab, PRIVATE_RUN, private_run["main_pid"]) == []


def test_job_private_tmp_holds_the_files_and_is_cleaned(lab: Any, shared_dir: Path) -> None:
    pid = start_job(lab, PRIVATE_TMP, [
        "/usr/bin/unshare", "-Urm", "/bin/sh", "-c",
        f"/bin/mount -t tmpfs none /run && /bin/mount -t tmpfs none /tmp && {SLEEP}"])
    try:
        r = stj(lab, PRIVATE_TMP, "readlink /proc/self/ns/mnt; ls -A /tmp")
        assert r.returncode == 0, r.stderr
        mnt, *in_tmp = r.stdout.splitlines()
        assert mnt == ns_of(lab, pid, "mnt")
        assert len(in_tmp) == 1 and in_tmp[0].startswith(f"{PRIVATE_TMP}-"), in_tmp
        assert node_sh(lab, f"ls -d /tmp/{in_tmp[0]} 2>/dev/null; true") == ""  # the node's
        src = shared_dir / "nsw-src2.bin"
        src.write_bytes(b"private tmp\n" * 1000)
        src.chmod(0o644)
        assert stj(lab, "-ssh", "scp", PRIVATE_TMP, str(src), "r:/tmp/up.bin").returncode == 0
        out = shared_dir / "nsw-down2"
        out.mkdir()
        out.chmod(0o777)
        r = stj(lab, "-ssh", "scp", PRIVATE_TMP, "r:/tmp/up.bin", str(out / "down.bin"))
        assert r.returncode == 0, r.stderr
        assert (out / "down.bin").read_bytes() == src.read_bytes()
        assert node_sh(lab, f"ls -A /proc/{pid}/root/tmp").split() == ["up.bin"]
        assert leftovers(lab, PRIVATE_TMP, pid) == []
    finally:
        adoptctl(lab, "node1", "job", "end", PRIVATE_TMP, check=False)


@pytest.mark.usefixtures("agents_end_sessions_cleanly")
def test_job_end_kills_the_session_and_removes_its_files(lab: Any, shared_dir: Path) -> None:
    """The session's files are in the node's /tmp (the job hides only /run); the job ends
    while the session runs: its processes are gone, the agent still removes them, as
    alice, through the job's mount namespace that it held open."""
    job = PRIVATE_RUN + "2"
    pid = start_job(lab, job, ["/usr/bin/unshare", "-Urm", "/bin/sh", "-c",
                               f"/bin/mount -t tmpfs none /run && {SLEEP}"])
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), job, "echo up; exec sleep 1000000"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        during = leftovers(lab, job, pid)
        assert len(during) == 3 and during[0].startswith("/run/callerid-adopt/sessions/"), \
            during      # the agent's, and the job's in /tmp seen from the node and the job
        adoptctl(lab, "node1", "job", "end", job)
        assert p.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while leftovers(lab, job) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftovers(lab, job) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        adoptctl(lab, "node1", "job", "end", job, check=False)


def test_job_with_its_own_network_namespace(lab: Any) -> None:
    pid = start_job(lab, OWN_NET, ["/usr/bin/unshare", "-Urn", "/bin/sh", "-c", SLEEP])
    try:
        assert ns_of(lab, pid, "net") != ns_of(lab, "self", "net")
        r = stj(lab, OWN_NET, "readlink /proc/self/ns/net; readlink /proc/self/ns/mnt; "
                "cat /proc/self/cgroup")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:2] == [ns_of(lab, pid, "net"), ns_of(lab, "self", "mnt")]
        assert any(session_cgroup(OWN_NET).fullmatch(line) for line in lines), lines
        assert leftovers(lab, OWN_NET, pid) == []
    finally:
        adoptctl(lab, "node1", "job", "end", OWN_NET, check=False)
