"""Attacks on the admission socket, in the lab: requests acted on after the module gave
up, and one user's logins starving another's.

The logins are real PAM account checks: `pamtester` runs the node's PAM stack (pam_python
+ pam/pam_adopt.py, as under sshd) for a real TCP connection from the source node, with
the accepted socket inherited and SSH_CONNECTION set. The node agents, their admission
sockets, MUNGE and the cgroups are the real ones. What each agent decided, and when, is
read from its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, wait_for

pytestmark = pytest.mark.root

PORTS = count(6300)
OLD_POOL = 32  # the admission pool of 66dd130, first come first served
ADMISSION_SOCKET = "/run/callerid-adopt/admission.sock"  # in each lab node

# Runs N account checks at once, one per accepted connection (the lab's pam_probe.py does
# one): PROBE OUT HOST PORT SERVICE USER N. Writes OUT.ready when listening, then OUT (a
# JSON list: pamtester's pid, rc, output, SSH_CONNECTION, seconds) when all are done.
PROBE = r'''
import json, os, socket, subprocess, sys, threading, time
out, host, port, service, user, n = sys.argv[1:7]
n = int(n)
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(n)
open(out + ".ready", "w").close()
conns = [s.accept()[0] for _ in range(n)]
results = [None] * n

def check(i, conn):
    peer, local = conn.getpeername(), conn.getsockname()
    ssh_connection = f"{peer[0]} {peer[1]} {local[0]} {local[1]}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SSH_CONNECTION": ssh_connection}
    t0 = time.monotonic()
    p = subprocess.Popen(["pamtester", "-v", "-I", f"rhost={peer[0]}", service, user,
                          "acct_mgmt"], env=env, pass_fds=(conn.fileno(),),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = p.communicate(timeout=120)[0]
    results[i] = {"pid": p.pid, "rc": p.returncode, "output": output,
                  "ssh_connection": ssh_connection, "seconds": time.monotonic() - t0}
    conn.close()

threads = [threading.Thread(target=check, args=(i, c)) for i, c in enumerate(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(out + ".tmp", "w") as f:
    json.dump(results, f)
os.rename(out + ".tmp", out)
'''

# Opens N connections to HOST:PORT once told to (a line on stdin, so that the test can
# put it in a job first), and holds them until the other side closes them.
CONNECT = r'''
import socket, sys
sys.stdin.readline()
conns = [socket.create_connection((sys.argv[1], int(sys.argv[2])))
         for _ in range(int(sys.argv[3]))]
for c in conns:
    c.recv(1)
'''

DECISION = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ node_agent\.agent\.admission: admission: (\S+) "
    r"from \S+ \(([^)]*)\) pid (\d+): (?:(ALLOW|DENY|IGNORE) (\S+)(?: job (\S+))?|dropped)"
    r".*?\((\d+\.\d) ms(?: after it was read)?\).*$", re.M)


@dataclass(frozen=True)
class Decision:
    """One admission line of an agent's log."""

    at: float  # when it was logged (epoch seconds)
    user: str
    ssh_connection: str
    pid: int
    decision: str  # ALLOW, DENY, IGNORE or "dropped"
    reason: str
    job: str | None
    ms: float  # from when the agent read the request
    line: str

    @property
    def arrived(self) -> float:
        return self.at - self.ms / 1000


def decisions(log_text: str) -> list[Decision]:
    out = []
    for m in DECISION.finditer(log_text):
        stamp, user, conn, pid, decision, reason, job, ms = m.groups()
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append(Decision(at, user, conn, int(pid), decision or "dropped", reason or "",
                            job, float(ms), m.group(0)))
    return out


class Logins:
    """N account checks of `user` on node2 for N connections from `src` (inside `job`
    there, when given), all at once; `.results` once `wait()` returns."""

    def __init__(self, lab: Any, shared: Path, user: str, n: int, *, src: str = "node1",
                 job: str | None = None) -> None:
        port = next(PORTS)
        self.out = shared / f"logins-{port}"
        probe = shared / "admission_probe.py"
        probe.write_text(PROBE)
        connect = shared / "admission_connect.py"
        connect.write_text(CONNECT)
        host = lab.ip("node2")
        self.probe = lab.popen("node2", ["/usr/bin/python3", str(probe), str(self.out), host,
                                         str(port), lab.pam_service("node2"), user, str(n)])
        wait_for(Path(str(self.out) + ".ready"))
        self.client = lab.popen(src, ["/usr/bin/python3", str(connect), host, str(port),
                                      str(n)], user=user, stdin=subprocess.PIPE, text=True)
        if job is not None:
            adoptctl(lab, src, "job", "attach", job, str(self.client.pid))
        assert self.client.stdin is not None
        self.client.stdin.write("go\n")
        self.client.stdin.close()
        self.results: list[dict[str, Any]] = []

    def wait(self, timeout: float = 120) -> list[dict[str, Any]]:
        try:
            self.probe.wait(timeout=timeout)
            self.client.wait(timeout=timeout)
            wait_for(self.out, timeout=5)
        finally:
            for p in (self.probe, self.client):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        self.results = json.loads(self.out.read_text())
        return self.results


def start_jobs(lab: Any, user: str, ids: Sequence[str], nodes: Sequence[str]) -> None:
    for job in ids:
        for node in nodes:
            adoptctl(lab, node, "job", "start", "--id", job, "--user", user)
        time.sleep(0.02)  # distinct start times: "newest" is well defined


@pytest.fixture(autouse=True)
def clean(lab: Any) -> Iterator[None]:
    lab.set_pam("node2", [])
    yield
    lab.set_pam("node2", [])
    for node in lab.nodes:
        for j in json.loads(adoptctl(lab, node, "jobs", "--json").stdout):
            adoptctl(lab, node, "job", "end", j["id"], check=False)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process SIGSTOPped for the duration (SIGCONT even on failure)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def spawn_with_pid(lab: Any, pid: int, node: str, argv: Sequence[str], user: str,
                   tries: int = 50) -> subprocess.Popen[bytes] | None:
    """Start argv in `node` as `user` with exactly `pid`, as pid reuse would: the kernel
    hands out ns_last_pid + 1 next (if free). Another process of the machine may fork in
    between: then try again. None if it never worked."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p: subprocess.Popen[bytes] = lab.popen(node, list(argv), user=user)
        if p.pid == pid:
            # Until it runs the command: the lab's wrapper first moves itself into the
            # node's cgroups, then execs.
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}/comm").read_text().strip() != Path(argv[0]).name:
                assert time.monotonic() < deadline, f"{argv} did not start"
                time.sleep(0.01)
            return p
        p.kill()
        p.wait()
    return None


def cgroups_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_a_request_read_after_the_module_gave_up_adopts_nothing(lab: Any,
                                                                shared_dir: Path) -> None:
    """The agent is stopped (SIGSTOP) while alice logs in with timeout=1: the module gives
    up and the login is denied; its process exits and its pid goes to an unrelated
    process (bob's). Once the agent continues it finds the request in its socket: it
    must drop it, and move nothing into alice's job."""
    start_jobs(lab, "alice", ["j"], ["node2"])
    lab.set_pam("node2", ["timeout=1"])
    agent = lab.agent_pid("node2")
    assert agent is not None
    mark = len(lab.agent_log("node2"))
    recycled = None
    try:
        with stopped(agent):
            login = Logins(lab, shared_dir, "alice", 1).wait()[0]
            # Denied by the module itself: the agent could not answer in time.
            assert login["rc"] != 0, login
            assert "Permission denied" in login["output"], login
            # The login's process is gone; an unrelated process of bob gets its pid.
            recycled = spawn_with_pid(lab, login["pid"], "node2", ["/bin/sleep", "1000"],
                                      "bob")
            assert recycled is not None, f"could not start a process with pid {login['pid']}"
            before = cgroups_of(recycled.pid)
        # The agent runs again and reads the stale request.
        deadline = time.monotonic() + 20
        while not (mine := [d for d in decisions(lab.agent_log("node2")[mark:])
                            if d.pid == login["pid"]]):
            assert time.monotonic() < deadline, "the agent logged nothing for the request"
            time.sleep(0.05)
        time.sleep(0.2)  # anything it would do after that line
        after = cgroups_of(recycled.pid)
    finally:
        if recycled is not None:
            recycled.kill()
            recycled.wait()
    print(f"login denied by the module after {login['seconds']:.2f} s; agent: "
          f"{mine[0].line}")
    assert "job_j" not in after and after == before, (
        f"bob's unrelated process {recycled.pid} was moved into alice's job:\n{after}")
    assert [d.decision for d in mine] == ["dropped"], [d.line for d in mine]
    assert "the module's deadline passed" in mine[0].line, mine[0].line
    assert f"adopting pid {login['pid']}" not in lab.agent_log("node2")[mark:]


def pending_connections(lab: Any, node: str, path: str) -> int:
    """Connections waiting in the backlog of a node's listening Unix socket (ss's Recv-Q
    for a listener)."""
    out = lab.run(node, ["ss", "-xlnH"]).stdout
    for line in out.splitlines():
        fields = line.split()
        if path in fields:
            return int(fields[2])
    raise AssertionError(f"{path} is not listening on {node}:\n{out}")


def test_one_users_stuck_logins_do_not_hold_up_another_users(lab: Any,
                                                             shared_dir: Path) -> None:
    """alice's logins from node1 (two jobs there and here) all wait on caller ID from
    node1, whose agent is black-holed: each holds a worker until its call times out
    (rpc_timeout, 2 s). More of them than the old pool had workers are in the agent when
    bob logs in (two jobs here, from inside the older one on this node). bob's login must
    not wait for any of alice's to end, and must land in its own job (not the newest).

    So that the scenario does not depend on how fast this machine starts 48 pamtesters,
    alice's logins are held back (the agent stopped) until all have connected: the agent
    then reads them at once, and bob's login follows."""
    n_alice = OLD_POOL + 16
    start_jobs(lab, "alice", ["A", "B"], ["node1", "node2"])
    start_jobs(lab, "bob", ["X", "Y"], ["node2"])
    # Room for the time alice's logins are held back: their calls still get rpc_timeout.
    lab.set_pam("node2", ["timeout=10"])
    agent = lab.agent_pid("node2")
    assert agent is not None
    mark = len(lab.agent_log("node2"))
    lab.blackhole("node1", on=True)
    try:
        with stopped(agent):
            alice = Logins(lab, shared_dir, "alice", n_alice, job="A")
            deadline = time.monotonic() + 60
            while pending_connections(lab, "node2", ADMISSION_SOCKET) < n_alice:
                assert time.monotonic() < deadline, "alice's logins never reached the agent"
                time.sleep(0.05)
        bob = Logins(lab, shared_dir, "bob", 1, src="node2", job="X").wait()[0]
        alices = alice.wait()
    finally:
        lab.blackhole("node1", on=False)
    seen = decisions(lab.agent_log("node2")[mark:])
    (bobs,) = [d for d in seen if d.ssh_connection == bob["ssh_connection"]]
    alice_conns = {r["ssh_connection"] for r in alices}
    alice_seen = [d for d in seen if d.ssh_connection in alice_conns]
    in_agent = [d for d in alice_seen if d.arrived <= bobs.arrived < d.at]
    answered = sorted(r["seconds"] for r in alices)
    print(f"bob: {bobs.decision} {bobs.reason} job {bobs.job}, agent {bobs.ms:.1f} ms, "
          f"pamtester {bob['seconds'] * 1000:.0f} ms; alice's logins in the agent then: "
          f"{len(in_agent)}, the first of them ended "
          f"{(min(d.at for d in in_agent) - bobs.arrived) * 1000:.0f} ms after bob's "
          f"arrived; alice's {len(alices)} logins: p50 {statistics.median(answered):.2f} s, "
          f"max {answered[-1]:.2f} s (pamtester, including the time held back)")
    assert len(in_agent) > OLD_POOL, (
        f"the attack was not reproduced: only {len(in_agent)} of alice's logins were in "
        f"the agent when bob's arrived")
    assert bob["rc"] == 0, bob
    assert (bobs.decision, bobs.reason, bobs.job) == ("ALLOW", "caller-id", "X"), bobs.line
    # bob did not wait for a worker held by one of alice's stuck logins.
    assert bobs.at < min(d.at for d in in_agent), (
        f"bob's login waited {bobs.ms:.0f} ms, behind alice's stuck logins")
    # alice's own logins all got their answer in time (newest: node1 cannot say).
    assert all(r["rc"] == 0 for r in alices), [r for r in alices if r["rc"] != 0][:3]
    assert {d.job for d in alice_seen} == {"B"}, {d.line for d in alice_seen if d.job != "B"}
