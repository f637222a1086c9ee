"""condor_ssh_to_job's habits in the lab (issue 12 item 3), on the native registry: the
greeting of an interactive session, and nothing else on the streams of commands, scp,
sftp and rsync; -remove-on-interrupt; CLUSTER.PROC ids, which the native registry takes
as names. (Slurm's side: tests/integration/test_slurm_ssh_to_job.py.)

Real sshd -i, munged, cgroups and agents; terminals are a tmux server of the lab user's
inside node1, driven with send-keys and read with capture-pane.
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

from tests.integration.helpers import Tmux, adoptctl, process_alive

pytestmark = pytest.mark.root

JOB = "hab1"


@pytest.fixture(scope="module")
def job(lab: Any, shared_dir: Path) -> Iterator[dict[str, Any]]:
    work = shared_dir / "hab-work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    adoptctl(lab, "node1", "job", "run", "--id", JOB, "--user", "alice", "--cwd", str(work),
             "--", "/bin/sleep", "1000000")
    yield {"work": work, "main_pid": show(lab, JOB)["main_pid"]}
    adoptctl(lab, "node1", "job", "end", JOB, check=False)


def show(lab: Any, job_id: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        adoptctl(lab, "node1", "job", "show", job_id, "--json").stdout)[0]
    return info


def stj(lab: Any, *argv: str, user: str = "alice", node: str = "node1",
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin("ssh-to-job"), *argv], user=user, check=False, timeout=60,
        input=stdin)
    return result


def sh(lab: Any, script: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = lab.run(
        "node1", ["sh", "-c", script], user="alice", check=False, timeout=60)
    return result


def test_an_interactive_session_is_greeted(lab: Any, job: dict[str, Any],
                                           shared_dir: Path) -> None:
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-hab-greet")
    try:
        t.start(["sh", "-c", '"$@"; echo "STATUS=$?"', "sh", lab.venv_bin("ssh-to-job"),
                 "-name", "node1", JOB])
        screen = t.wait(lambda: (lambda s: s if "Your job" in s else "")(t.screen()),
                        why="the greeting")
        lines = screen.splitlines()
        i = lines.index("Welcome to node1!")
        assert lines[i + 1] == f"Your job {JOB} is running with pid(s) {job['main_pid']}."
        t.keys("exit", "Enter")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh-to-job to end")
        assert "STATUS=0" in t.screen(), t.screen()
    finally:
        t.kill()


def test_a_command_prints_nothing_but_its_own(lab: Any, job: dict[str, Any]) -> None:
    r = stj(lab, JOB, "true")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = stj(lab, JOB, "printf x")
    assert (r.returncode, r.stdout, r.stderr) == (0, "x", "")
    # a login shell without a terminal (ssh -T): its input is commands, no greeting
    r = stj(lab, "-T", JOB, stdin="echo from-stdin\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "from-stdin\n", "")
    # even when the terminal is forced: a command gets none
    r = stj(lab, "-o", "RequestTTY=force", JOB, "echo tty-cmd")
    assert r.returncode == 0 and "Welcome" not in r.stdout and \
        r.stdout.strip() == "tty-cmd", (r.stdout, r.stderr)


def test_transfers_stay_byte_clean(lab: Any, job: dict[str, Any], shared_dir: Path) -> None:
    src = shared_dir / "hab-src.bin"
    src.write_bytes(bytes(range(256)) * 4096)   # 1 MiB
    src.chmod(0o644)
    out = shared_dir / "hab-out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    stj_bin = lab.venv_bin("ssh-to-job")
    r = stj(lab, "-ssh", "scp", JOB, str(src), "remote:up.bin")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
    r = stj(lab, "-ssh", "scp", JOB, "remote:up.bin", str(out / "scp.bin"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
    r = sh(lab, f"cd {out} && rsync -e {stj_bin} {JOB}:up.bin rsync.bin")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stderr
    r = sh(lab, f"cd {out} && echo 'get up.bin sftp.bin' | {stj_bin} -ssh 'sftp -q -b -' {JOB}")
    assert r.returncode == 0 and "Welcome" not in r.stdout + r.stderr, (r.stdout, r.stderr)
    # the bytes of a command's stdout, exactly
    r = sh(lab, f"{stj_bin} {JOB} cat up.bin > {out}/cat.bin")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for name in ("scp.bin", "rsync.bin", "sftp.bin", "cat.bin"):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def _wait_gone(lab: Any, job_id: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = adoptctl(lab, "node1", "job", "show", job_id, "--json", check=False)
        if r.returncode != 0:
            return True
        time.sleep(0.2)
    return False


def test_remove_on_interrupt_ends_the_job_on_ctrl_c(lab: Any, shared_dir: Path) -> None:
    adoptctl(lab, "node1", "job", "run", "--id", "hab-rm", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    main_pid = show(lab, "hab-rm")["main_pid"]
    t = Tmux(lab, "node1", "alice", shared_dir / "tmux-hab-rm")
    try:
        # The shell reports how ssh-to-job ended; its trap keeps it alive for that.
        t.start(["sh", "-c", 'trap : INT; "$@"; echo "STATUS=$?"', "sh",
                 lab.venv_bin("ssh-to-job"), "-remove-on-interrupt", "hab-rm",
                 "echo up; exec sleep 1000000"])
        t.wait(lambda: "up" in t.screen().split(), why="the remote command")
        t.keys("C-c")
        screen = t.wait(lambda: (lambda s: s if "STATUS=" in s else "")(t.screen()),
                        why="ssh-to-job to end")
        assert "STATUS=130" in screen, screen
        assert "ssh-to-job: Removed: job hab-rm ended (" in screen, screen
        assert _wait_gone(lab, "hab-rm")
        assert not process_alive(main_pid)
    finally:
        t.kill()
        adoptctl(lab, "node1", "job", "end", "hab-rm", check=False)


def test_remove_on_interrupt_is_the_owners(lab: Any, job: dict[str, Any]) -> None:
    """bob cannot use it on alice's job: no session, the job untouched."""
    r = stj(lab, "-remove-on-interrupt", JOB, "true", user="bob")
    assert r.returncode == 1 and r.stderr.startswith("ssh-to-job: Not found: ") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert process_alive(job["main_pid"]) and show(lab, JOB)["state"] == "running"


def test_remove_on_interrupt_does_nothing_when_the_session_ends_normally(
        lab: Any, job: dict[str, Any]) -> None:
    r = stj(lab, "-remove-on-interrupt", JOB, "echo done")
    assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", "")
    assert process_alive(job["main_pid"]) and show(lab, JOB)["state"] == "running"


def test_a_native_job_named_like_cluster_proc_is_taken_as_named(lab: Any) -> None:
    adoptctl(lab, "node1", "job", "run", "--id", "7.0", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    try:
        r = stj(lab, "7.0", 'echo "$CALLERID_JOB_ID"')
        assert (r.returncode, r.stdout, r.stderr) == (0, "7.0\n", "")
        r = stj(lab, "7", "true")   # no CLUSTER.PROC rewriting here: 7 is another name
        assert r.returncode == 1 and r.stderr.startswith("ssh-to-job: Not found: "), r.stderr
    finally:
        adoptctl(lab, "node1", "job", "end", "7.0", check=False)
