"""ssh-to-job in the lab, as a user would use it (real sshd -i, real munged, real cgroups).

Interactive sessions and Ctrl-C run in a real terminal: a tmux server of the lab user's
inside node1, driven with send-keys and read with capture-pane.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node_agent.config import DEFAULT_MAX_SESSIONS_PER_USER
from tests.integration.helpers import Tmux, adoptctl, process_alive

pytestmark = pytest.mark.root

JOB = "stj1"
# The v2 line of a process in one of the job's sessions: each has a cgroup of its own.
SESSION_CGROUP = re.compile(rf"0::/callerid/job_{JOB}/ssh-to-job/[0-9a-f]{{16}}")


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
    out: str = lab.run("node1", ["sh", "-c", "ls /run/callerid-adopt/sessions 2>/dev/null || true"]
                       ).stdout
    return out.split()


def test_command_runs_inside_the_job(lab: Any, job: dict[str, Any]) -> None:
    r = stj(lab, "node1", JOB, 'hostname; pwd; echo "$MYVAR|$CALLERID_JOB_ID|$CALLERID_JOB_PIDS"; '
            "cat /proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "node1" and lines[1] == str(job["work"])
    env, pids = lines[2].rsplit("|", 1)[0], lines[2].rsplit("|", 1)[1].split()
    assert env == f"hello world|{JOB}" and pids[0] == str(job["main_pid"])
    assert SESSION_CGROUP.search(r.stdout), r.stdout
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


@pytest.mark.usefixtures("agents_end_sessions_cleanly")
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


def job_pids(lab: Any, job_id: str) -> list[int]:
    info = json.loads(adoptctl(lab, "node1", "job", "show", job_id, "--json").stdout)[0]
    pids: list[int] = info["pids"]
    return pids


def test_interactive_session_in_a_terminal(lab: Any, job: dict[str, Any],
                                           shared_dir: Path) -> None:
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-interactive")
    try:
        t.start(["sh", "-c", '"$@"; echo "STATUS=$?"', "sh", lab.venv_bin("ssh-to-job"), JOB])
        # Expressions whose output differs from the typed line: the echo of the command
        # itself cannot match.
        t.wait(lambda: "$" in t.screen() or "#" in t.screen(), why="a prompt")
        t.keys('echo "C$((1+1))=$PWD"', "Enter")
        t.keys('echo "E$((1+1))=$MYVAR|$CALLERID_JOB_ID|$CALLERID_JOB_PIDS"', "Enter")
        t.keys('echo "G$((1+1))=$(cat /proc/self/cgroup | grep ^0::)"', "Enter")
        t.keys('echo "T$((1+1))=$(tty)"', "Enter")
        screen = t.wait(lambda: (lambda s: s if "T2=" in s else "")(t.screen()),
                        why="the last answer")
        assert f"C2={job['work']}" in screen
        assert f"E2=hello world|{JOB}|{job['main_pid']}" in screen
        assert SESSION_CGROUP.search(screen.split("G2=", 1)[1]), screen
        assert "T2=/dev/pts/" in screen  # a real terminal on the far side
        t.keys("exit", "Enter")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh-to-job to end")
        assert "STATUS=0" in t.screen(), t.screen()
    finally:
        t.kill()
    t_end = time.monotonic() + 10
    while sessions_left(lab) and time.monotonic() < t_end:
        time.sleep(0.1)
    assert sessions_left(lab) == []


def test_ctrl_c_leaves_nothing_behind(lab: Any, job: dict[str, Any], shared_dir: Path) -> None:
    tmp = shared_dir / "ctrlc-tmp"
    tmp.mkdir(mode=0o777)
    tmp.chmod(0o777)
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-ctrlc")
    try:
        # The shell reports how ssh-to-job ended (exit 130, or killed by SIGINT: both 130
        # in $?); its trap keeps it alive for that, and is reset in its children.
        t.start(["sh", "-c", 'trap : INT; "$@"; echo "STATUS=$?"', "sh",
                 lab.venv_bin("ssh-to-job"), JOB, "echo up; exec sleep 1000000"],
                env={"TMPDIR": str(tmp)})
        t.wait(lambda: "up" in t.screen().split(), why="the remote command")
        assert len(job_pids(lab, JOB)) > 1
        assert sessions_left(lab)
        assert list(tmp.iterdir())
        t.keys("C-c")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh-to-job to end")
        assert "STATUS=130" in t.screen(), t.screen()
    finally:
        t.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
            job_pids(lab, JOB) != [job["main_pid"]] or sessions_left(lab)):
        time.sleep(0.1)
    assert job_pids(lab, JOB) == [job["main_pid"]]  # no sshd, no sleep left in the job
    assert sessions_left(lab) == []  # no session directory on the node
    assert list(tmp.iterdir()) == []  # no client temp directory


def test_auto_retry_waits_for_a_job_that_starts_later(lab: Any) -> None:
    p = lab.popen("node1", [lab.venv_bin("ssh-to-job"), "-auto-retry", "stj-late", "hostname"],
                  user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(5)
        assert p.poll() is None, p.communicate()
        adoptctl(lab, "node1", "job", "run", "--id", "stj-late", "--user", "alice", "--",
                 "/bin/sleep", "1000000")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "node1"
        assert "waiting for job stj-late to start" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        adoptctl(lab, "node1", "job", "end", "stj-late", check=False)


def test_concurrent_sessions_up_to_the_per_user_cap(lab: Any, job: dict[str, Any]) -> None:
    """As many sessions at once as one user may have (past that they are refused:
    test_starvation.py)."""
    n = DEFAULT_MAX_SESSIONS_PER_USER
    remote = "echo session-{} $CALLERID_JOB_ID $$; grep ^0:: /proc/self/cgroup"
    procs = [lab.popen("node1", [lab.venv_bin("ssh-to-job"), JOB, remote.format(i)],
                       user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    remote_pids, cgroups = set(), set()
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, (i, err)
        first, cgroup = out.splitlines()
        name, job_id, pid = first.split()
        assert (name, job_id) == (f"session-{i}", JOB)
        assert SESSION_CGROUP.fullmatch(cgroup), cgroup
        remote_pids.add(pid)
        cgroups.add(cgroup)
    assert len(remote_pids) == len(cgroups) == n  # distinct sessions
    deadline = time.monotonic() + 10
    while sessions_left(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions_left(lab) == []


def test_agent_killed_mid_session_ends_the_client_at_once(lab: Any,
                                                          job: dict[str, Any]) -> None:
    """kill -9 of the agent serving a session: the client says so in one line of its own
    and exits within seconds (it used to wait for the job to end: the relay closed ssh's
    socket while its own thread still read it, so ssh never saw the end)."""
    client = lab.popen("node2", [lab.venv_bin("ssh-to-job"), "-name", "node1", JOB,
                                 "echo started; exec sleep 1000000"], user="alice",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "started"
        lab.agent_stop("node1", sig=9)
        t0 = time.monotonic()
        _, err = client.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        lab.agent_start("node1")
    ours = [line for line in err.splitlines() if line.startswith("ssh-to-job: ")]
    assert client.returncode == 1 and len(ours) == 1, err
    assert ours[0].startswith("ssh-to-job: Agent unreachable: "), err
    assert took < 15, took
