"""ssh-to-job in the lab, as a user would use it (real sshd -i, real munged, real cgroups).

More of issue 4 (interactive sessions under tmux, -auto-retry, 20 concurrent sessions,
Ctrl-C clean-up, the benchmark) is still to come; these cover what is built.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, process_alive

pytestmark = pytest.mark.root

JOB = "stj1"


@pytest.fixture(scope="module")
def job(lab: Any, shared_dir: Path) -> Iterator[dict[str, Any]]:
    work = shared_dir / "stj-work"
    work.mkdir()
    work.chmod(0o777)
    adoptctl(lab, "node1", "job", "run", "--id", JOB, "--user", "alice", "--cwd", str(work),
             "--env", "MYVAR=hello world", "--", "/bin/sleep", "1000000")
    info = json.loads(adoptctl(lab, "node1", "job", "show", JOB, "--json").stdout)[0]
    yield {"work": work, "main_pid": info["main_pid"]}
    adoptctl(lab, "node1", "job", "end", JOB, check=False)


def stj(lab: Any, node: str, *argv: str, user: str = "alice", cwd: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin("ssh-to-job"), *argv], user=user, cwd=cwd, check=False,
        timeout=60)
    return result


def sessions_left(lab: Any) -> list[str]:
    return lab.run("node1", ["sh", "-c", "ls /run/callerid-adopt/sessions 2>/dev/null || true"]
                   ).stdout.split()


def test_command_runs_inside_the_job(lab: Any, job: dict[str, Any]) -> None:
    r = stj(lab, "node1", JOB, 'hostname; pwd; echo "$MYVAR|$CALLERID_JOB_ID|$CALLERID_JOB_PIDS"; '
            "cat /proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "node1" and lines[1] == str(job["work"])
    env, pids = lines[2].rsplit("|", 1)[0], lines[2].rsplit("|", 1)[1].split()
    assert env == f"hello world|{JOB}" and pids[0] == str(job["main_pid"])
    assert f"0::/callerid/job_{JOB}/ssh-to-job" in r.stdout
    assert sessions_left(lab) == []


def test_exit_status_and_other_node(lab: Any, job: dict[str, Any]) -> None:
    assert stj(lab, "node1", JOB, "exit 7").returncode == 7
    r = stj(lab, "node2", "-name", "node1", JOB, "hostname")
    assert r.returncode == 0 and r.stdout.strip() == "node1", r.stderr


def test_other_user_and_unknown_job_are_refused_clearly(lab: Any, job: dict[str, Any]) -> None:
    before = lab.run("node1", ["pgrep", "-c", "-u", "bob", "sshd"], check=False).stdout.strip()
    r = stj(lab, "node1", JOB, "true", user="bob")
    assert r.returncode == 1 and r.stderr.startswith("ssh-to-job: ") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    after = lab.run("node1", ["pgrep", "-c", "-u", "bob", "sshd"], check=False).stdout.strip()
    assert before == after and sessions_left(lab) == []
    r = stj(lab, "node1", "no-such-job", "true")
    assert r.returncode == 1 and "Not found" in r.stderr
    r = stj(lab, "node1", "-no-such-option", JOB)
    assert r.returncode == 2


def test_scp_rsync_sftp_both_ways(lab: Any, job: dict[str, Any], shared_dir: Path) -> None:
    src = shared_dir / "stj-src.bin"
    src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    src.chmod(0o644)
    out = shared_dir / "stj-out"
    out.mkdir()
    out.chmod(0o777)
    stj_bin = lab.venv_bin("ssh-to-job")
    assert stj(lab, "node1", "-ssh", "scp", JOB, str(src), "remote:up.bin").returncode == 0
    assert stj(lab, "node1", "-ssh", "scp", JOB, "anyhost:up.bin",
               str(out / "scp.bin")).returncode == 0
    r = lab.run("node1", ["sh", "-c", f"cd {out} && rsync -e {stj_bin} {JOB}:up.bin rsync.bin"
                          f" && rsync -e {stj_bin} rsync.bin {JOB}:back.bin"], user="alice",
                check=False)
    assert r.returncode == 0, r.stderr
    r = lab.run("node1", ["sh", "-c", f"echo 'get back.bin {out}/sftp.bin' | "
                          f"{stj_bin} -ssh 'sftp -b -' {JOB}"], user="alice", check=False)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for name in ("scp.bin", "rsync.bin", "sftp.bin"):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert hashlib.sha256((job["work"] / "back.bin").read_bytes()).hexdigest() == digest


def test_job_end_kills_open_sessions(lab: Any, shared_dir: Path) -> None:
    adoptctl(lab, "node1", "job", "run", "--id", "stj2", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), "stj2", "echo up; exec sleep 1000000"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        pids = json.loads(adoptctl(lab, "node1", "job", "show", "stj2", "--json").stdout)[0]
        adoptctl(lab, "node1", "job", "end", "stj2")
        assert p.wait(timeout=30) != 0
        for pid in pids["pids"]:
            assert not process_alive(pid)
        deadline = time.monotonic() + 10
        while sessions_left(lab) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sessions_left(lab) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
