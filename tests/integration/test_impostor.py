"""Nobody can take the agent's place: the port squatter, in the lab.

The attack: while node1's agent is down (a crash, an upgrade, a restart), alice listens
on its port and collects what clients send there: bob's credential from his ssh-to-job,
root's CallerId credential from node2's agent deciding bob's login. With the agent on a
privileged port she cannot bind it at all; with the port made unprivileged on purpose
(net.ipv4.ip_unprivileged_port_start, per network namespace) the clients still refuse
her, and nothing she captured can be read or used on another node.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, wait_for
from tests.integration.test_adoption_e2e import DENY_UNKNOWN, end_jobs, landed_in, ssh

pytestmark = pytest.mark.root

PORT = 411
BIND = ("import socket, sys\n"
        "for host in sys.argv[1:]:\n"
        "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)\n"
        "    try:\n"
        "        s.bind((host, 411)); print(host, 'bound')\n"
        "    except OSError as e:\n"
        "        print(host, e.strerror)\n")


def start_job(lab: Any, job: str, user: str, node: str) -> None:
    adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--", "/bin/sleep", "1000000")


@pytest.fixture
def restore_node1(lab: Any) -> Iterator[None]:
    try:
        yield
    finally:
        lab.run("node1", ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=1024"])
        if lab.agent_pid("node1") is None:
            lab.agent_start("node1")
        end_jobs(lab)
        lab.set_pam("node2", [])


def test_a_user_cannot_bind_the_agents_port(lab: Any, restore_node1: None) -> None:
    """With the agent down, alice can bind none of its addresses, nor loopback (where the
    agent does not listen but `ssh localhost` would send node2's question)."""
    lab.agent_stop("node1")
    r = lab.run("node1", ["/usr/bin/python3", "-c", BIND, lab.ip("node1"),
                          lab.ip("node1", 6), "127.0.0.1", "::"], user="alice")
    assert r.stdout.split("\n")[:4] == [f"{lab.ip('node1')} Permission denied",
                                        f"{lab.ip('node1', 6)} Permission denied",
                                        "127.0.0.1 Permission denied", ":: Permission denied"]


def test_clients_refuse_a_squatter_and_what_it_captures_is_useless(
        lab: Any, restore_node1: None, shared_dir: Path) -> None:
    start_job(lab, "b7", "bob", "node1")
    for job in ("A", "B"):                      # bob's two jobs on both nodes
        for node in ("node1", "node2"):
            start_job(lab, job, "bob", node)
        time.sleep(0.05)
    # bob's login from job B on node1 to node2, ready to go (attached while node1's agent
    # is still up), then node1's agent goes down: the jobs go on without it.
    login = lab.popen("node1", ["/bin/sh", "-c", 'read go; exec "$@"', "sh",
                                *ssh(lab, "node2", "cat /proc/self/cgroup")], user="bob",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    adoptctl(lab, "node1", "job", "attach", "B", str(login.pid))
    lab.agent_stop("node1")
    lab.run("node1", ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"])
    captured = shared_dir / "captured.jsonl"
    captured.touch()
    captured.chmod(0o666)
    squatter = lab.popen("node1", [lab.venv_bin("python"), str(shared_dir / "squatter.py"),
                                   "serve", str(PORT), str(captured), "A"],
                         user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert squatter.stdout.readline().strip() == "listening", squatter.stderr.read()
        # bob's ssh-to-job from node2, asking node1 by name: one clear line, exit 1.
        r = lab.run("node2", [lab.venv_bin("ssh-to-job"), "-name", "node1", "b7", "true"],
                    user="bob", check=False)
        assert r.returncode == 1, r.stderr
        node1_targets = (f"ipv4:{lab.ip('node1')}:{PORT}", f"ipv6:[{lab.ip('node1', 6)}]:{PORT}")
        assert r.stderr.strip().splitlines() in ([
            f"ssh-to-job: Authentication failed: the agent at {t} is not root on the node "
            "meant: its answer carries no credential; ignored"] for t in node1_targets)
        # bob's login from job B on node1 to node2, where he has two jobs: node2's agent
        # asks "node1" and gets "job A" from the squatter. It must not believe it.
        lab.set_pam("node2", ["action_unknown=deny"])
        out, err = login.communicate("go\n", timeout=60)
        assert login.returncode == 255 and DENY_UNKNOWN in err, out + err
        assert landed_in(out) is None
        log2 = lab.agent_log("node2")
        assert (f"caller ID from {lab.ip('node1')} refused: the agent at "
                f"ipv4:{lab.ip('node1')}:{PORT} is not root on the node meant") in log2
    finally:
        for p in (squatter, login):
            if p.poll() is None:
                p.kill()
            p.communicate()
    methods = [json.loads(line)["method"].rsplit("/", 1)[1]
               for line in captured.read_text().splitlines()]
    assert "ListJobs" in methods and "CallerId" in methods, methods
    # What alice got: she cannot read any of it, and node2's agent refuses all of it.
    r = lab.run("node2", [lab.venv_bin("python"), str(shared_dir / "squatter.py"), "replay",
                          str(captured), f"{lab.ip('node2')}:{PORT}"], user="alice")
    results = json.loads(r.stdout)
    assert len(results) == len(methods)
    for res in results:
        assert "Unauthorized credential" in res["decode"], res
        assert res["code"] == "UNAUTHENTICATED", res
        assert "not for this node" in res["details"], res
        assert res["details"].split(" minted for ")[1].split(",")[0] in (
            f"ip:{lab.ip('node1')}", f"ip:{lab.ip('node1', 6)}"), res
    # The real agent comes back on the (still unprivileged) port and says so.
    lab.agent_start("node1")
    wait_for(Path(lab.dir) / "logs" / "agent-node1.log")
    assert f"port {PORT} is not privileged on this node" in lab.agent_log("node1")
    # ...and answers bob's ssh-to-job again (the real agent's proof is accepted).
    r = lab.run("node2", [lab.venv_bin("ssh-to-job"), "-name", "node1", "b7", "echo", "ok"],
                user="bob", check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
