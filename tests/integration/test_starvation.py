"""No user can starve the agent: one user's ssh-to-job streams never stop other calls.

alice attacks node1's agent: 200 OpenJobShell streams that never send a frame (she needs
no job for that; deploy/lab/progs/idle_streams.py, with valid MUNGE
credentials), and 100 real `ssh-to-job` sessions into a job of hers. Meanwhile bob logs
in from inside his job b1 on node1 to node2, where he has two jobs (b1, and the newer
b2): node2's agent must ask node1's which job the connection comes from (CallerId). It
must still get the answer, so the login lands in b1 for the reason `caller-id` (not in
the newest job for `unknown-newest`, as when CallerId could not be answered), and root's
`adoptctl job run` / `job end` on node1 must still work.

Only alice's share (max_sessions_per_user = 16) of the sessions is hers; the rest of her
attempts are refused with one clear line, and a stream that sends nothing is ended after
the open timeout (5 s), both logged by the agent.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl

pytestmark = pytest.mark.root

PER_USER = 16  # the default max_sessions_per_user: the lab's agents use the defaults
OPEN_TIMEOUT = 5  # the default session_open_timeout
CAP_MESSAGE = (f"uid {{uid}} already has {PER_USER} ssh-to-job sessions on node1 "
               f"(max_sessions_per_user)")
CGROUP_JOB = re.compile(r"^0::/callerid/job_([^/]+)/adopted$", re.M)
WAIT = 120.0  # generous: only reached when something is wrong


@pytest.fixture(autouse=True)
def jobs(lab: Any) -> Iterator[None]:
    """alice: a1 on node1. bob: b1 on both nodes, then b2 (the newest) on node2."""
    lab.set_pam("node2", [])
    run_job(lab, "node1", "a1", "alice")
    run_job(lab, "node1", "b1", "bob")
    run_job(lab, "node2", "b1", "bob")
    time.sleep(0.05)  # distinct start times: "newest" is well defined
    run_job(lab, "node2", "b2", "bob")
    yield
    for node in lab.nodes:
        for j in json.loads(adoptctl(lab, node, "jobs", "--json").stdout):
            adoptctl(lab, node, "job", "end", j["id"], check=False)


def run_job(lab: Any, node: str, job: str, user: str) -> None:
    adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--",
             "/bin/sleep", "1000000")


def uid_of(lab: Any, user: str) -> int:
    return int(lab.run("node1", ["id", "-u", user]).stdout)


@dataclass(frozen=True)
class Login:
    job: str | None  # the job whose cgroup the remote shell was in
    reason: str | None  # the reason node2's agent logged for it
    agent_ms: float | None
    seconds: float
    output: str


def bobs_two_job_login(lab: Any) -> Login:
    """bob, inside b1 on node1: `ssh node2`; which job on node2 did it land in, and why."""
    argv = lab.ssh_argv("node2", "echo SSH_CONNECTION=$SSH_CONNECTION; cat /proc/self/cgroup")
    p = lab.popen("node1", ["/bin/sh", "-c", 'read go; exec "$@"', "sh", *argv], user="bob",
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  text=True)
    try:
        adoptctl(lab, "node1", "job", "attach", "b1", str(p.pid))
        t0 = time.monotonic()
        out, _ = p.communicate("go\n", timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    m = CGROUP_JOB.search(out)
    conn = re.search(r"^SSH_CONNECTION=(.+)$", out, re.M)
    reason = agent_ms = None
    if conn:
        lines = [ln for ln in lab.agent_log("node2").splitlines()
                 if f"({conn.group(1).strip()})" in ln and "admission:" in ln]
        d = re.search(r": (?:ALLOW|DENY|IGNORE) (\S+)(?: job \S+)? \(([\d.]+) ms\)",
                      lines[-1] if lines else "")
        if d:
            reason, agent_ms = d.group(1), float(d.group(2))
    return Login(m.group(1) if m else None, reason, agent_ms, seconds, out)


def assert_others_unaffected(lab: Any) -> None:
    """bob's two-job login lands in the right job through CallerId, and root's registry
    commands on node1 work."""
    login = bobs_two_job_login(lab)
    assert (login.job, login.reason) == ("b1", "caller-id"), login
    r = adoptctl(lab, "node1", "job", "run", "--id", "r1", "--user", "bob", "--",
                 "/bin/sleep", "1000000", check=False)
    assert r.returncode == 0 and "job r1 of bob started on node1" in r.stdout, r.stderr
    r = adoptctl(lab, "node1", "job", "end", "r1", check=False)
    assert r.returncode == 0 and "job r1 ended on node1" in r.stdout, r.stderr


class IdleStreams:
    """deploy/lab/progs/idle_streams.py as `user` on `node`, holding `n` streams."""

    def __init__(self, lab: Any, shared: Path, node: str, user: str, n: int) -> None:
        self.status = shared / f"idle-{user}-{n}.json"
        self.proc = lab.popen(node, [lab.venv_bin("python"), str(shared / "idle_streams.py"),
                                     str(self.status), str(n)], user=user,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status.read_text())
            return data
        except FileNotFoundError:
            return {"opened": 0, "outstanding": 0, "ended": {}, "last": {}}

    def wait(self, what: str, predicate: Any) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while not predicate(status := self.read()):
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, f"{what}: {status}"
            time.sleep(0.1)
        return status

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def test_200_idle_streams_starve_nobody(lab: Any, shared_dir: Path) -> None:
    alice = uid_of(lab, "alice")
    log_mark = len(lab.agent_log("node1"))
    idle = IdleStreams(lab, shared_dir, "node1", "alice", 200)
    try:
        idle.wait("200 streams opened", lambda s: s["opened"] >= 200)
        assert_others_unaffected(lab)
        # Past her share, alice's streams are refused at once; those admitted are ended
        # once the open timeout has passed without an `open` frame.
        status = idle.wait("refused and timed-out streams",
                           lambda s: s["ended"].get("RESOURCE_EXHAUSTED", 0) >= 184
                           and s["ended"].get("DEADLINE_EXCEEDED", 0) >= PER_USER)
        assert status["last"]["RESOURCE_EXHAUSTED"] == CAP_MESSAGE.format(uid=alice)
        assert status["last"]["DEADLINE_EXCEEDED"] == f"no `open` frame within {OPEN_TIMEOUT} s"
        assert set(status["ended"]) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, status
        assert_others_unaffected(lab)  # still, with the streams coming back
    finally:
        idle.stop()
    log = lab.agent_log("node1")[log_mark:]
    assert f"ssh-to-job: refused: {CAP_MESSAGE.format(uid=alice)}" in log
    assert (f"ssh-to-job: uid {alice} sent no `open` frame within {OPEN_TIMEOUT} s: "
            f"stream ended") in log


def start_sessions(lab: Any, work: Path, n: int) -> None:
    """n `ssh-to-job -name node1 a1 ...` of alice's, from node2, all at once; each writes
    work/I.out (the remote command prints "up"), work/I.err and work/I.rc at its end."""
    script = work / "sessions.sh"
    script.write_text(
        f'for i in $(seq {n}); do\n'
        f'  ( "$@" > {work}/$i.out 2> {work}/$i.err; echo $? > {work}/$i.rc ) &\n'
        'done\nwait\n')
    lab.popen("node2", ["/bin/sh", str(script), lab.venv_bin("ssh-to-job"), "-name", "node1",
                        "a1", "echo up; exec sleep 1000000"], user="alice",
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def session_results(work: Path, n: int) -> tuple[list[int], list[int]]:
    """(running: printed "up", no exit yet; ended: has exited), by index."""
    running, ended = [], []
    for i in range(1, n + 1):
        if (work / f"{i}.rc").exists():
            ended.append(i)
        elif (work / f"{i}.out").exists() and "up" in (work / f"{i}.out").read_text():
            running.append(i)
    return running, ended


def test_100_sessions_and_200_idle_streams_of_one_user_starve_nobody(
        lab: Any, shared_dir: Path, agents_end_sessions_cleanly: None) -> None:
    alice = uid_of(lab, "alice")
    work = shared_dir / "sessions"
    work.mkdir()
    work.chmod(0o777)
    start_sessions(lab, work, 100)
    deadline = time.monotonic() + WAIT
    while sum(map(len, (results := session_results(work, 100)))) < 100:
        assert time.monotonic() < deadline, f"sessions neither running nor refused: {results}"
        time.sleep(0.2)
    running, ended = results
    assert len(running) == PER_USER, results
    refusal = f"ssh-to-job: Too many sessions: {CAP_MESSAGE.format(uid=alice)}\n"
    for i in ended:
        rc, err = (work / f"{i}.rc").read_text().strip(), (work / f"{i}.err").read_text()
        assert (rc, err) == ("1", refusal), (i, rc, err)
    # Her sessions hold her whole share: every idle stream on top is refused.
    idle = IdleStreams(lab, shared_dir, "node1", "alice", 200)
    try:
        status = idle.wait("200 streams refused",
                           lambda s: s["ended"].get("RESOURCE_EXHAUSTED", 0) >= 200)
        assert status["last"]["RESOURCE_EXHAUSTED"] == CAP_MESSAGE.format(uid=alice)
        assert_others_unaffected(lab)
        assert session_results(work, 100)[0] == running  # her sessions are untouched
    finally:
        idle.stop()
    adoptctl(lab, "node1", "job", "end", "a1")  # ends her sessions
    deadline = time.monotonic() + WAIT
    while len(session_results(work, 100)[1]) < 100:
        assert time.monotonic() < deadline, "ssh-to-job still running after job end"
        time.sleep(0.2)
