"""An adopted ssh login joins the job's namespaces (pam_adopt's join_container, as
pam_slurm_adopt's): real sshd, pam_python, agents and cgroups.

Alice's job on node2 has a private /tmp, as a job container gives it (Slurm's
job_container/tmpfs): its main process is ``unshare -Urm`` (a user namespace, so no
privilege is involved) that mounts a tmpfs over /tmp and writes /tmp/x there, then execs
sleep. From inside the same job on node1, ``ssh node2 cat /tmp/x`` must read the job's
file: the agent adopted the login and handed pam_adopt the job's mount namespace, which
the module entered before sshd started the session. With ``join_container=false`` the
login sees the node's /tmp instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, node_sh
from tests.integration.test_adoption_e2e import landed_in, run_from, ssh

pytestmark = pytest.mark.root

JOB = "nsj"
SECRET = "only-in-the-jobs-tmp"
SHOW = "cat /tmp/x 2>/dev/null || echo no-x; readlink /proc/self/ns/mnt; cat /proc/self/cgroup"


def start(lab: Any, node: str, job: str, script: str) -> int:
    """Start alice's job on `node` running `script` (which ends by exec'ing sleep); its
    main pid once it sleeps."""
    adoptctl(lab, node, "job", "run", "--id", job, "--user", "alice", "--",
             "/bin/sh", "-c", script)
    pid = int(json.loads(adoptctl(lab, node, "job", "show", job, "--json").stdout)[0]
              ["main_pid"])
    deadline = time.monotonic() + 20
    while node_sh(lab, f"cat /proc/{pid}/comm", node=node).strip() != "sleep":
        assert time.monotonic() < deadline, f"job {job} on {node} never reached sleep"
        time.sleep(0.05)
    return pid


def mnt_of(lab: Any, pid: int | str, node: str = "node2") -> str:
    return node_sh(lab, f"readlink /proc/{pid}/ns/mnt", node=node).strip()


@pytest.fixture
def private_tmp(lab: Any) -> Iterator[int]:
    """Job JOB on node1 (plain) and on node2 (private /tmp holding x); node2's main pid."""
    lab.set_pam("node2", [])
    start(lab, "node1", JOB, "exec /bin/sleep 1000000")
    pid = start(lab, "node2", JOB, "exec /usr/bin/unshare -Urm /bin/sh -c "
                f"'/bin/mount -t tmpfs none /tmp && echo {SECRET} > /tmp/x && "
                "exec /bin/sleep 1000000'")
    try:
        yield pid
    finally:
        lab.set_pam("node2", [])
        for node in ("node1", "node2"):
            adoptctl(lab, node, "job", "end", JOB, check=False)


def login(lab: Any) -> tuple[int, list[str], str]:
    """ssh node2 SHOW as alice from inside JOB on node1: (rc, stdout lines, stderr)."""
    r = run_from(lab, "node1", "alice", ssh(lab, "node2", SHOW), job=JOB)
    return r.returncode, r.stdout.splitlines(), r.stderr


def test_the_job_really_has_a_private_tmp(lab: Any, private_tmp: int) -> None:
    assert mnt_of(lab, private_tmp) != mnt_of(lab, "self")
    assert node_sh(lab, "cat /tmp/x 2>/dev/null; true", node="node2") == ""
    assert node_sh(lab, f"cat /proc/{private_tmp}/root/tmp/x", node="node2").strip() == SECRET


def test_the_login_joins_the_jobs_mount_namespace(lab: Any, private_tmp: int) -> None:
    rc, out, err = login(lab)
    assert rc == 0, err
    assert out[:2] == [SECRET, mnt_of(lab, private_tmp)], out
    assert landed_in("\n".join(out)) == JOB, out
    log = lab.syslog()
    assert "entered its mnt namespaces" in log, log[-2000:]
    assert f"job {JOB}" in lab.agent_log("node2") and "namespaces mnt" in \
        lab.agent_log("node2")


def test_join_container_false_keeps_the_nodes_namespaces(lab: Any, private_tmp: int) -> None:
    lab.set_pam("node2", ["join_container=false"])
    rc, out, err = login(lab)
    assert rc == 0, err
    # No x in the node's /tmp; the node's mount namespace.
    assert out[:2] == ["no-x", mnt_of(lab, "self", "node2")], out
    assert landed_in("\n".join(out)) == JOB, out   # adopted into the job's cgroups all the same


def test_a_job_without_namespaces_of_its_own_changes_nothing(lab: Any) -> None:
    start(lab, "node1", "plain", "exec /bin/sleep 1000000")
    start(lab, "node2", "plain", "exec /bin/sleep 1000000")
    try:
        r = run_from(lab, "node1", "alice", ssh(lab, "node2", "readlink /proc/self/ns/mnt; "
                                                 "cat /proc/self/cgroup"), job="plain")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == mnt_of(lab, "self", "node2") and landed_in(r.stdout) == "plain", \
            lines
    finally:
        for node in ("node1", "node2"):
            adoptctl(lab, node, "job", "end", "plain", check=False)


def test_nodename_must_be_the_agents_node(lab: Any, private_tmp: int) -> None:
    lab.set_pam("node2", ["nodename=node2", "disable_x11=1"])
    rc, out, err = login(lab)
    assert rc == 0 and out[0] == SECRET, (out, err)
    lab.set_pam("node2", ["nodename=node9"])
    rc, out, err = login(lab)
    assert rc == 255 and "Access denied by pam_adopt: internal error" in err, (out, err)
    assert "nodename=node9 is not this agent's node node2" in lab.agent_log("node2")
