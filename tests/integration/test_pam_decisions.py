"""The whole decision table of pam_adopt, fast: pamtester instead of full ssh logins.

For each case a real TCP connection goes from node1 (from inside a job, or not) to a
probe on node2, which runs `pamtester SERVICE USER acct_mgmt` with the accepted socket
inherited and SSH_CONNECTION set, exactly the PAM stack sshd would run (the lab's
`lab-sshd-node2` service: pam_python + pam/pam_adopt.py last in the account stack).
The node agents are real; node2's agent asks node1's over gRPC when it must. The
agent's log line for the connection says what it decided.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, wait_for

pytestmark = pytest.mark.root

PORTS = count(6100)






class Probe:
    """One pamtester run for one connection; .decision is the agent's log line for it."""

    def __init__(self, lab: Any, shared: Path, user: str, *, job: str | None = None,
                 client_user: str | None = None, family: int = 4,
                 service: str | None = None, as_user: str | None = None) -> None:
        port = next(PORTS)
        out = shared / f"probe-{port}"
        host = lab.ip("node2", family)
        probe = lab.popen("node2", ["/usr/bin/python3", str(shared / "pam_probe.py"), str(out),
                                    host, str(port), service or lab.pam_service("node2"),
                                    as_user or user])
        try:
            wait_for(Path(str(out) + ".ready"))
            target = f"[{host}]" if family == 6 else host
            client = lab.popen("node1", ["/bin/sh", "-c", 'read go; exec "$@"', "sh",
                                         "/usr/bin/python3", "-c", CONNECT, target.strip("[]"),
                                         str(port)],
                               user=client_user or user, stdin=subprocess.PIPE, text=True)
            if job is not None:
                adoptctl(lab, "node1", "job", "attach", job, str(client.pid))
            client.communicate("go\n", timeout=60)
            probe.wait(timeout=60)
            wait_for(out)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        result = json.loads(out.read_text())
        self.rc: int = result["rc"]
        self.output: str = result["stdout"] + result["stderr"]
        self.seconds: float = result["seconds"]
        self.ssh_connection: str = result["ssh_connection"]
        line = [ln for ln in lab.agent_log("node2").splitlines()
                if f"({self.ssh_connection})" in ln and "admission:" in ln]
        self.agent_line = line[-1] if line else ""
        m = re.search(r": (ALLOW|DENY|IGNORE) (\S+)(?: job (\S+))? \(", self.agent_line)
        self.decision = m.group(1) if m else None
        self.reason = m.group(2) if m else None
        self.job = m.group(3) if m else None

    def __repr__(self) -> str:
        return (f"Probe(rc={self.rc}, decision={self.decision}, reason={self.reason}, "
                f"job={self.job}, output={self.output!r}, agent={self.agent_line!r})")


CONNECT = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
           "s.recv(1)")


@pytest.fixture
def probe(lab: Any, shared_dir: Path) -> Iterator[Any]:
    def make(user: str, **kw: Any) -> Probe:
        return Probe(lab, shared_dir, user, **kw)

    lab.set_pam("node2", [])
    yield make
    lab.set_pam("node2", [])
    for node in lab.nodes:
        for j in json.loads(adoptctl(lab, node, "jobs", "--json").stdout):
            adoptctl(lab, node, "job", "end", j["id"], check=False)


def jobs(lab: Any, user: str, ids: Sequence[str], nodes: Sequence[str] = ("node1", "node2"),
         ) -> None:
    for job in ids:
        for node in nodes:
            adoptctl(lab, node, "job", "start", "--id", job, "--user", user)
        time.sleep(0.02)  # distinct start times: "newest" is well defined


def test_no_jobs(lab: Any, probe: Any) -> None:
    p = probe("bob")
    assert p.rc != 0 and (p.decision, p.reason) == ("DENY", "no-jobs"), p
    lab.set_pam("node2", ["action_no_jobs=ignore"])
    p = probe("bob")
    # PAM_IGNORE from the last module: the rest of the account stack decides (pam_unix: ok).
    assert p.rc == 0 and (p.decision, p.reason) == ("IGNORE", "no-jobs"), p


def test_other_users_job_does_not_admit(lab: Any, probe: Any) -> None:
    jobs(lab, "alice", ["a"])
    p = probe("bob")
    assert p.rc != 0 and p.reason == "no-jobs", p


def test_one_job_needs_no_network(lab: Any, probe: Any) -> None:
    jobs(lab, "alice", ["a"])
    lab.blackhole("node1", port=411, on=True)  # proves no call to node1 is made
    try:
        p = probe("alice", job="a")
    finally:
        lab.blackhole("node1", port=411, on=False)
    assert p.rc == 0 and (p.decision, p.reason, p.job) == ("ALLOW", "one-job", "a"), p
    assert p.seconds < 1.0


@pytest.mark.parametrize("family", [4, 6])
def test_two_jobs_caller_id(lab: Any, probe: Any, family: int) -> None:
    jobs(lab, "alice", ["A", "B"])
    for job in ("A", "B"):
        p = probe("alice", job=job, family=family)
        assert p.rc == 0 and (p.decision, p.reason, p.job) == ("ALLOW", "caller-id", job), p


@pytest.mark.parametrize("option, rc_ok, decision, reason, job", [
    ("action_unknown=newest", True, "ALLOW", "unknown-newest", "B"),
    ("action_unknown=allow", True, "ALLOW", "unknown-allow", None),
    ("action_unknown=deny", False, "DENY", "unknown-deny", None),
    ("action_unknown=bogus", True, "ALLOW", "unknown-newest", "B"),  # bad value -> default
])
def test_two_jobs_from_no_job(lab: Any, probe: Any, option: str, rc_ok: bool, decision: str,
                              reason: str, job: str | None) -> None:
    jobs(lab, "alice", ["A", "B"])
    lab.set_pam("node2", [option])
    p = probe("alice")
    assert (p.rc == 0) == rc_ok and (p.decision, p.reason, p.job) == (decision, reason, job), p


def test_two_jobs_from_another_users_job_is_unknown(lab: Any, probe: Any) -> None:
    jobs(lab, "alice", ["A", "B"])
    jobs(lab, "bob", ["X"], nodes=["node1"])
    lab.set_pam("node2", ["action_unknown=deny"])
    # bob's job X on node1 opens the connection; PAM asks about alice on node2.
    p = probe("alice", job="X", client_user="bob")
    assert p.rc != 0 and (p.decision, p.reason) == ("DENY", "unknown-deny"), p
    assert "job X" in p.agent_line and "not one of alice" in p.agent_line


@pytest.mark.parametrize("option, rc_ok", [("action_adopt_failure=deny", False),
                                           ("action_adopt_failure=allow", True)])
def test_adoption_failure(lab: Any, probe: Any, option: str, rc_ok: bool) -> None:
    jobs(lab, "alice", ["a"], nodes=["node2"])
    # The job's cgroups vanish behind the agent's back: adopting into them fails.
    lab.run("node2", ["sh", "-c", "rmdir /sys/fs/cgroup/*/callerid/job_a/*/ "
                                  "/sys/fs/cgroup/*/callerid/job_a"])
    lab.set_pam("node2", [option])
    p = probe("alice")
    assert (p.rc == 0) == rc_ok and p.reason in ("adopt-failed", "adopt-failed-allow"), p


def test_root_is_ignored(lab: Any, probe: Any) -> None:
    p = probe("root")
    assert p.rc == 0 and p.decision is None, p  # the agent was never asked


def test_other_service_is_ignored(lab: Any, probe: Any) -> None:
    lab.set_pam("node2", ["service=not-this-one"])
    p = probe("bob")  # no job, yet admitted: the module stayed out
    assert p.rc == 0 and p.decision is None, p


@pytest.mark.parametrize("option, rc_ok", [("action_generic_failure=deny", False),
                                           ("action_generic_failure=allow", True),
                                           ("action_generic_failure=ignore", True)])
def test_local_agent_down(lab: Any, probe: Any, option: str, rc_ok: bool) -> None:
    lab.agent_stop("node2")
    try:
        lab.set_pam("node2", [option, "timeout=1"])
        p = probe("alice")
    finally:
        lab.agent_start("node2")
    assert (p.rc == 0) == rc_ok and p.decision is None, p
    assert p.seconds < 1.5, p


def test_blackholed_source_agent_costs_at_most_the_timeout(lab: Any, probe: Any) -> None:
    jobs(lab, "alice", ["A", "B"])
    lab.set_pam("node2", ["timeout=1"])
    lab.blackhole("node1", port=411, on=True)
    try:
        p = probe("alice", job="A")
    finally:
        lab.blackhole("node1", port=411, on=False)
    assert p.rc == 0 and (p.reason, p.job) == ("unknown-newest", "B"), p
    assert "DEADLINE_EXCEEDED" in p.agent_line or "UNAVAILABLE" in p.agent_line
    assert p.seconds < 1.0, p  # the agent keeps its call inside the module's timeout


def test_unknown_and_malformed_options_are_logged_not_fatal(lab: Any, probe: Any) -> None:
    jobs(lab, "alice", ["a"])
    lab.set_pam("node2", ["nosuchoption=x", "debug", "timeout=-3"])
    p = probe("alice", job="a")
    assert p.rc == 0 and p.reason == "one-job", p
    log = lab.syslog()
    assert "ignoring unknown option 'nosuchoption'" in log
    assert "timeout='-3'" in log
