"""Adoption of real ssh logins between lab nodes (pam_adopt under a real sshd).

Each node runs sshd with the PAM service `lab-sshd-<node>` whose account stack ends
with pam_python + pam/pam_adopt.py, and a node agent. Users ssh from node1 to node2
(and back) as they would from a job: the ssh client runs inside a job of the native
registry on the source node (started with `adoptctl job attach`), or outside any job.
What the remote shell prints from /proc/self/cgroup tells which job it landed in.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, login_burst, process_alive

pytestmark = pytest.mark.root

DENY_NO_JOBS = "Access denied by pam_adopt: you have no active jobs on this node"
DENY_UNKNOWN = ("Access denied by pam_adopt: this connection does not come from one of "
                "your jobs on this node")
DENY_GENERIC = "Access denied by pam_adopt: the node agent could not be asked"
CGROUP_JOB = re.compile(r"^0::/callerid/job_([^/]+)/adopted$", re.M)




def start_job(lab: Any, job: str, user: str, nodes: Sequence[str] = ("node1", "node2")) -> None:
    for node in nodes:
        adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--",
                 "/bin/sleep", "1000000")


def end_jobs(lab: Any) -> None:
    for node in lab.nodes:
        for j in json.loads(adoptctl(lab, node, "jobs", "--json").stdout):
            adoptctl(lab, node, "job", "end", j["id"], check=False)


def run_from(lab: Any, node: str, user: str, argv: Sequence[str], job: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run argv on `node` as `user`, inside `job` (attached before it starts) or no job."""
    p = lab.popen(node, ["/bin/sh", "-c", 'read go; exec "$@"', "sh", *argv], user=user,
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    try:
        if job is not None:
            adoptctl(lab, node, "job", "attach", job, str(p.pid))
        out, err = p.communicate("go\n", timeout=timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def ssh(lab: Any, to: str, command: str, *, family: int = 4, port: int = 22) -> list[str]:
    argv: list[str] = lab.ssh_argv(to, ["/bin/sh", "-c", command], family=family, port=port)
    return argv


def landed_in(output: str) -> str | None:
    """The job whose 'adopted' cgroup the remote shell is in (v2 line), or None."""
    m = CGROUP_JOB.search(output)
    return m.group(1) if m else None


@pytest.fixture(autouse=True)
def clean(lab: Any) -> Iterator[None]:
    lab.set_pam("node1", [])
    lab.set_pam("node2", [])
    yield
    end_jobs(lab)
    lab.set_pam("node1", [])
    lab.set_pam("node2", [])


def test_user_without_a_job_is_refused_with_one_sentence(lab: Any) -> None:
    start_job(lab, "a1", "alice", ["node2"])  # another user's job does not admit bob
    r = run_from(lab, "node1", "bob", ssh(lab, "node2", "true"))
    assert r.returncode == 255
    assert DENY_NO_JOBS in r.stderr
    assert "Access denied" not in r.stderr.replace(DENY_NO_JOBS, "")  # one sentence only


def test_one_job_adopts_and_job_end_kills_the_session(lab: Any) -> None:
    start_job(lab, "j1", "alice")
    r = run_from(lab, "node1", "alice", ssh(lab, "node2", "cat /proc/self/cgroup; "
                                              "echo CALLERID_JOB_ID=$CALLERID_JOB_ID"),
                 job="j1")
    assert r.returncode == 0, r.stderr
    assert landed_in(r.stdout) == "j1", r.stdout
    assert "freezer:/callerid/job_j1/adopted" in r.stdout
    assert "CALLERID_JOB_ID=j1" in r.stdout
    # The agent saw the login start (libpam opening the service's file) and warmed up.
    assert f"login starting ({lab.pam_service('node2')} opened)" in lab.agent_log("node2")
    # A long-running remote command dies with the job on node2.
    client = lab.popen("node1", ssh(lab, "node2", "echo started; exec sleep 1000000"),
                       user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "started"
        show = json.loads(adoptctl(lab, "node2", "job", "show", "j1", "--json").stdout)[0]
        sleeps = [p for p in show["pids"]
                  if open(f"/proc/{p}/comm").read().strip() == "sleep" and p != show["main_pid"]]
        assert sleeps, show
        adoptctl(lab, "node2", "job", "end", "j1")
        for pid in sleeps:
            assert not process_alive(pid)
        assert client.wait(timeout=20) != 0  # the connection went down with the job
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize("family", [4, 6])
def test_two_jobs_each_session_lands_in_the_job_it_came_from(lab: Any, family: int) -> None:
    start_job(lab, "A", "alice")
    time.sleep(0.05)
    start_job(lab, "B", "alice")
    for job in ("B", "A"):
        r = run_from(lab, "node1", "alice",
                     ssh(lab, "node2", "cat /proc/self/cgroup", family=family), job=job)
        assert r.returncode == 0, r.stderr
        assert landed_in(r.stdout) == job, (family, job, r.stdout)


def test_from_no_job_action_unknown(lab: Any) -> None:
    start_job(lab, "A", "alice")
    time.sleep(0.05)
    start_job(lab, "B", "alice")  # the newest
    cmd = ssh(lab, "node2", "cat /proc/self/cgroup")
    r = run_from(lab, "node1", "alice", cmd)  # default action_unknown=newest
    assert r.returncode == 0 and landed_in(r.stdout) == "B", r.stdout + r.stderr
    lab.set_pam("node2", ["action_unknown=allow"])
    r = run_from(lab, "node1", "alice", cmd)
    assert r.returncode == 0, r.stderr
    assert landed_in(r.stdout) is None and "callerid" not in r.stdout, r.stdout
    lab.set_pam("node2", ["action_unknown=deny"])
    r = run_from(lab, "node1", "alice", cmd)
    assert r.returncode == 255 and DENY_UNKNOWN in r.stderr, r.stderr
    # ...while a login from inside a job is still adopted under action_unknown=deny.
    r = run_from(lab, "node1", "alice", cmd, job="A")
    assert r.returncode == 0 and landed_in(r.stdout) == "A", r.stdout + r.stderr


def test_root_is_not_touched(lab: Any) -> None:
    r = run_from(lab, "node1", "root", ssh(lab, "node2", "cat /proc/self/cgroup"))
    assert r.returncode == 0, r.stderr
    assert "callerid" not in r.stdout


def test_other_pam_service_is_ignored(lab: Any) -> None:
    lab.set_pam("node2", ["service=some-other-service"])
    r = run_from(lab, "node1", "bob", ssh(lab, "node2", "cat /proc/self/cgroup"))
    assert r.returncode == 0, r.stderr  # bob has no job, but the module stayed out of it
    assert "callerid" not in r.stdout


def test_local_agent_down_applies_generic_failure_within_timeout(lab: Any) -> None:
    start_job(lab, "j1", "alice")
    lab.agent_stop("node2")
    try:
        lab.set_pam("node2", ["timeout=1"])
        t0 = time.monotonic()
        r = run_from(lab, "node1", "alice", ssh(lab, "node2", "true"), job="j1")
        elapsed = time.monotonic() - t0
        assert r.returncode == 255 and DENY_GENERIC in r.stderr, r.stderr
        assert elapsed < 1 + 5, elapsed  # the module's timeout plus an ssh login
        lab.set_pam("node2", ["timeout=1", "action_generic_failure=allow"])
        r = run_from(lab, "node1", "alice", ssh(lab, "node2", "cat /proc/self/cgroup"),
                     job="j1")
        assert r.returncode == 0 and landed_in(r.stdout) is None, r.stdout + r.stderr
    finally:
        lab.agent_start("node2")


def test_blackholed_source_agent_never_hangs_a_login(lab: Any) -> None:
    start_job(lab, "A", "alice")
    time.sleep(0.05)
    start_job(lab, "B", "alice")
    lab.set_pam("node2", ["timeout=2"])
    lab.blackhole("node1", port=411, on=True)
    try:
        for options, expect_rc, expect_job in (([], 0, "B"),
                                                (["action_unknown=deny"], 255, None)):
            lab.set_pam("node2", ["timeout=2", *options])
            t0 = time.monotonic()
            r = run_from(lab, "node1", "alice", ssh(lab, "node2", "cat /proc/self/cgroup"),
                         job="A", timeout=30)
            elapsed = time.monotonic() - t0
            assert r.returncode == expect_rc, (options, r.stderr)
            assert landed_in(r.stdout) == expect_job
            assert elapsed < 2 + 5, elapsed
    finally:
        lab.blackhole("node1", port=411, on=False)


def test_100_concurrent_logins_each_in_its_own_job(lab: Any, shared_dir: Any) -> None:
    jobs = {"A": "alice", "B": "alice", "C": "bob", "D": "bob"}
    for job, user in jobs.items():
        start_job(lab, job, user)
    per = 13  # 4 jobs x 13 logins x 2 directions = 104
    logged_before = len(lab.syslog())
    elapsed, logins = login_burst(lab, shared_dir, jobs, per,
                                  lambda dst: ssh(lab, dst, "cat /proc/self/cgroup"))
    wrong = [(x.src, x.job, x.out, x.err) for x in logins if landed_in(x.out) != x.job]
    assert not wrong, wrong[:3]
    logged = lab.syslog()
    if logged.startswith("(lab:"):  # a real syslog daemon has pam_adopt's lines
        return
    answered = sorted(int(ms) for ms in re.findall(r"answered in (\d+) ms",
                                                    logged[logged_before:]))
    assert len(answered) == len(logins)
    print(f"{len(logins)} concurrent logins in {elapsed:.1f} s, all in their own job; "
          f"pam_adopt's answer p50 {answered[len(answered) // 2]} ms, max {answered[-1]} ms")
