"""Finding a job from anywhere (issue 12, item 1), in a 3-node lab with the native backend.

node1's agent is stopped: node1 is the login node (the CLIs there have only agent.toml and
munged). Job 42 of alice runs on node2, job 43 of alice and 44 of bob on node3. The lab's
agent.toml has `nodes = "node[1-3]"`, so every search from node1 also finds node1 silent and
names it; `login.toml` is what a site's login node would have (the compute nodes only).
No -name anywhere: the job is found through its homes (the job index: node_agent/jobhome.py,
node_agent/agent/jobindex.py), else by the fan-out of ListJobs over `nodes`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab as lab_mod
from node_agent import jobhome
from tests.integration.conftest import it_lab
from tests.integration.helpers import adoptctl

pytestmark = pytest.mark.root

NOT_FOUND = "ssh-to-job: Not found: no job {job} on node[1-3] (or not yours); no answer from "
NODES = ["node1", "node2", "node3"]
# A deadline far above what finding the job costs: a black-holed node that delayed the
# answer would hold the command that long.
LONG_TIMEOUT = 30


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    """3 nodes, the agents of node2 and node3 only; no port-22 sshd (ssh-to-job needs none)."""
    the_lab = it_lab(nodes=3)
    try:
        the_lab.up(sshd=False)
        the_lab.agent_stop("node1")
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def work(lab: lab_mod.Lab, shared_dir: Path) -> Iterator[Path]:
    """alice's job 42 on node2 (in `work`, with dir/ to copy), her 43 and bob's 44 on node3."""
    work = shared_dir / "locate"
    (work / "dir" / "sub").mkdir(parents=True)
    (work / "dir" / "a.txt").write_text("alpha\n")
    (work / "dir" / "sub" / "b.txt").write_text("beta\n")
    for p in (work, work / "dir", work / "dir" / "sub"):
        p.chmod(0o777)
    for node, job, user in (("node2", "42", "alice"), ("node3", "43", "alice"),
                            ("node3", "44", "bob")):
        adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--cwd", str(work),
                 "--", "/bin/sleep", "1000000")
    yield work
    for node, job in (("node2", "42"), ("node3", "43"), ("node3", "44")):
        adoptctl(lab, node, "job", "end", job, check=False)


@pytest.fixture(scope="module")
def login_toml(lab: lab_mod.Lab, shared_dir: Path) -> Path:
    """A login node's agent.toml: the lab's, with the compute nodes only in `nodes` and a
    long per-call deadline."""
    text = lab.agent_config("node1").replace(
        f'nodes = "{lab.nodeset()}"', f'nodes = "node[2-3]"\nlocate_timeout = {LONG_TIMEOUT}')
    assert 'nodes = "node[2-3]"' in text
    path = shared_dir / "login.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def run(lab: lab_mod.Lab, node: str, prog: str, *argv: str, user: str = "alice",
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin(prog), *argv], user=user, cwd=cwd, check=False, timeout=120)
    return r


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


def sshd_count(lab: lab_mod.Lab, node: str, user: str) -> str:
    return lab.run(node, ["pgrep", "-c", "-u", user, "sshd"], check=False).stdout.strip()


@pytest.mark.parametrize("node", ["node1", "node3"])
def test_a_command_reaches_the_job_without_name(lab: lab_mod.Lab, work: Path,
                                                 node: str) -> None:
    """From the login node (no agent) and from another compute node."""
    assert lab.agent_pid("node1") is None
    r = run(lab, node, "ssh-to-job", "42", "hostname; pwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["node2", str(work)]


def test_rsync_and_scp_from_the_login_node(lab: lab_mod.Lab, work: Path,
                                           shared_dir: Path) -> None:
    dest = shared_dir / "alice-copies"
    dest.mkdir(mode=0o777)
    dest.chmod(0o777)
    r = run(lab, "node1", "ssh-to-job", "-ssh", "scp", "42", "remote:dir/a.txt", "a-scp.txt",
            cwd=dest)
    assert r.returncode == 0, r.stderr
    assert (dest / "a-scp.txt").read_text() == "alpha\n"
    r = lab.run("node1", ["rsync", "-av", "-e", lab.venv_bin("ssh-to-job"), "42:dir/", "out/"],
                user="alice", cwd=dest, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (dest / "out" / "sub" / "b.txt").read_text() == "beta\n"


def test_a_reference_with_its_node_skips_the_search(lab: lab_mod.Lab, work: Path) -> None:
    """42@node2 asks node2 alone: node1's silence is not mentioned even by -debug."""
    r = run(lab, "node1", "ssh-to-job", "-debug", "42@node2", "hostname")
    assert r.returncode == 0 and r.stdout.strip() == "node2", r.stderr
    assert "no answer from" not in r.stderr and "nodes answered" not in r.stderr
    # the search's -debug lines: the job's homes do not know it; who answered, who did not
    r = run(lab, "node1", "ssh-to-job", "-debug", "99", "true")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    homes = jobhome.homes("99", NODES)
    assert lines[0].startswith(f"ssh-to-job: job 99's homes ({', '.join(homes)}) do not "
                               "know it"), r.stderr
    assert lines[0].endswith(": asking every node"), r.stderr
    assert lines[1:3] == [
        "ssh-to-job: 2 of 3 nodes answered (32 at a time, within 2 s each) in "
        + lines[1].split(" in ", 1)[1],
        "ssh-to-job: no answer from node1 (Agent unreachable)"]


def test_unknown_job_is_one_line_naming_the_silent_node(lab: lab_mod.Lab, work: Path) -> None:
    line = one_line(run(lab, "node1", "ssh-to-job", "99", "true"))
    assert line == NOT_FOUND.format(job=99) + "node1 (Agent unreachable)"


def test_another_users_job_is_refused_like_a_missing_one(lab: lab_mod.Lab, work: Path) -> None:
    before = sshd_count(lab, "node2", "bob")
    line = one_line(run(lab, "node1", "ssh-to-job", "42", "true", user="bob"))
    assert line == NOT_FOUND.format(job=42) + "node1 (Agent unreachable)"
    # and directly: the agent of node2 says the same as for a missing job
    line = one_line(run(lab, "node1", "ssh-to-job", "42@node2", "true", user="bob"))
    assert line == "ssh-to-job: Not found: no job 42 on node2 (or not yours)"
    assert sshd_count(lab, "node2", "bob") == before


def test_a_black_holed_node_is_named_and_does_not_delay_a_job_elsewhere(
        lab: lab_mod.Lab, work: Path, login_toml: Path) -> None:
    lab.blackhole("node3")
    try:
        t0 = time.monotonic()
        r = run(lab, "node1", "ssh-to-job", "-config", str(login_toml), "42", "hostname")
        took = time.monotonic() - t0
        assert r.returncode == 0 and r.stdout.strip() == "node2", r.stderr
        # node3's call would have held it LONG_TIMEOUT s: it was cancelled at the match
        assert took < LONG_TIMEOUT / 2, took
        # nowhere: the lab's deadline (2 s) passes, and node3 is named
        line = one_line(run(lab, "node1", "ssh-to-job", "43", "true"))
        assert line == NOT_FOUND.format(job=43) + \
            "node1 (Agent unreachable), node3 (Timeout)"
    finally:
        lab.blackhole("node3", on=False)


def test_auto_retry_waits_for_a_job_that_starts_later(lab: lab_mod.Lab, work: Path) -> None:
    proc = lab.popen("node1", [lab.venv_bin("ssh-to-job"), "-auto-retry", "45", "hostname"],
                     user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the CLI is waiting (it said so) before the job exists
        assert proc.stderr is not None
        line = proc.stderr.read(len("ssh-to-job: waiting for job 45 to start"))
        assert line == "ssh-to-job: waiting for job 45 to start"
        adoptctl(lab, "node3", "job", "run", "--id", "45", "--user", "alice", "--",
                 "/bin/sleep", "1000000")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip() == "node3", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        adoptctl(lab, "node3", "job", "end", "45", check=False)


def test_adoptctl_prints_references(lab: lab_mod.Lab, work: Path) -> None:
    jobs = json.loads(adoptctl(lab, "node2", "jobs", "--json").stdout)
    assert [(j["id"], j["ref"]) for j in jobs] == [("42", "42@node2")]
    table = adoptctl(lab, "node2", "jobs").stdout.splitlines()
    assert table[1].split()[:2] == ["42@node2", "alice"]


def test_adoptctl_jobs_all(lab: lab_mod.Lab, work: Path, login_toml: Path) -> None:
    def refs(r: subprocess.CompletedProcess[str]) -> list[str]:
        return sorted(j["ref"] for j in json.loads(r.stdout))

    cfg = ("--config", str(login_toml))
    r = run(lab, "node1", "adoptctl", *cfg, "jobs", "--all", "--json")
    assert r.returncode == 0 and refs(r) == ["42@node2", "43@node3"], r.stderr  # not bob's
    r = run(lab, "node1", "adoptctl", *cfg, "jobs", "--all", "--json", user="bob")
    assert r.returncode == 0 and refs(r) == ["44@node3"], r.stderr
    r = run(lab, "node1", "adoptctl", *cfg, "jobs", "--all", "--json", user="root")
    assert r.returncode == 0 and refs(r) == ["42@node2", "43@node3", "44@node3"], r.stderr
    # the lab's own config has node1 too, whose agent is stopped: listed, and said
    r = run(lab, "node1", "adoptctl", "jobs", "--all")
    assert r.returncode == 1, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["JOBID", "42@node2",
                                                                  "43@node3"]
    assert r.stderr == "adoptctl: Incomplete: no answer from node1 (Agent unreachable)\n"


# -- the job index -------------------------------------------------------------------------

INDEX_WAIT = 15.0  # an agent announces within a second; a home down is retried every 5 s


def debug_until(lab: lab_mod.Lab, job: str, want: str, *args: str) -> str:
    """`ssh-to-job -debug JOB hostname` from node1 until its stderr has `want` (the index
    is filled and emptied asynchronously); the last stderr."""
    deadline = time.monotonic() + INDEX_WAIT
    while True:
        r = run(lab, "node1", "ssh-to-job", "-debug", *args, job, "hostname")
        if want in r.stderr or time.monotonic() > deadline:
            return r.stderr
        time.sleep(0.5)


def job_homed(first: str, alive: str, runs_on: str) -> str:
    """A job id whose first home is `first` and second `alive`, not yet used here."""
    for i in range(1000):
        job = f"h{i}"
        if jobhome.homes(job, NODES) == [first, alive] and job != runs_on:
            return job
    raise AssertionError("no such job id in 1000")


def test_the_job_is_found_through_its_homes(lab: lab_mod.Lab, work: Path) -> None:
    """Two calls, not a fan-out: the home that knows says node3, node3 confirms. (When node1,
    whose agent is stopped, is a home, the other home answers.)"""
    err = debug_until(lab, "43", "says it runs on node3")
    assert "says it runs on node3" in err, err
    assert "nodes answered" not in err, err       # no fan-out
    r = run(lab, "node1", "ssh-to-job", "43", "hostname")
    assert r.returncode == 0 and r.stdout.strip() == "node3", r.stderr


def test_an_ended_job_leaves_its_homes(lab: lab_mod.Lab, work: Path) -> None:
    adoptctl(lab, "node2", "job", "run", "--id", "46", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    try:
        assert "says it runs on node2" in debug_until(lab, "46", "says it runs on node2")
    finally:
        adoptctl(lab, "node2", "job", "end", "46", check=False)
    err = debug_until(lab, "46", "do not know it")
    assert "job 46's homes" in err and "do not know it" in err, err
    assert "Not found: no job 46" in err, err


def test_a_black_holed_home_does_not_delay_the_answer(lab: lab_mod.Lab, work: Path) -> None:
    """The job's first home black-holed: the second is asked after HOME_HEDGE, well within
    the fan-out's deadline (2 s in the lab)."""
    job = job_homed("node3", "node2", "node2")
    adoptctl(lab, "node2", "job", "run", "--id", job, "--user", "alice", "--",
             "/bin/sleep", "1000000")
    try:
        assert "says it runs on node2" in debug_until(lab, job, "says it runs on node2")
        lab.blackhole("node3")
        try:
            t0 = time.monotonic()
            r = run(lab, "node1", "ssh-to-job", "-debug", job, "hostname")
            took = time.monotonic() - t0
        finally:
            lab.blackhole("node3", on=False)
        assert r.returncode == 0 and r.stdout.strip() == "node2", r.stderr
        assert f"job {job}'s home node2 says it runs on node2" in r.stderr, r.stderr
        assert "nodes answered" not in r.stderr, r.stderr
        assert took < 2.0, took
    finally:
        adoptctl(lab, "node2", "job", "end", job, check=False)


INDEX_PROBE = """
import json, sys
import grpc
from node_agent import config, jobhome
from node_agent.auth import MungeAuthenticator
from node_agent.client import AgentClient
from node_agent import dial
cfg = config.load("/etc/callerid-adopt/agent.toml")
auth = MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
job, home = sys.argv[1], sys.argv[2]
out = {}
with AgentClient(dial.agent_target(cfg, home), auth, timeout=5) as c:
    out["located"] = list(c.locate_job_future(job).result().nodes)
    try:
        c.announce_jobs("node2", [(job, 0)])
        out["announce"] = "OK"
    except grpc.RpcError as e:
        out["announce"] = e.code().name
    out["after"] = list(c.locate_job_future(job).result().nodes)
print(json.dumps(out))
"""


def test_only_agents_announce_and_each_user_locates_only_their_jobs(
        lab: lab_mod.Lab, work: Path) -> None:
    """With real MUNGE from node2: bob may not announce (his attempt changes nothing and is
    logged), and a home tells bob nothing of alice's job 43, alice where it runs."""
    debug_until(lab, "43", "says it runs on node3")
    home = next(h for h in jobhome.homes("43", NODES) if h != "node1")   # an agent runs

    def probe(user: str) -> dict[str, object]:
        r = lab.run("node2", [lab.venv_bin("python"), "-c", INDEX_PROBE, "43", home],
                    user=user, check=False, timeout=60)
        assert r.returncode == 0, r.stderr
        answer: dict[str, object] = json.loads(r.stdout)
        return answer

    assert probe("bob") == {"located": [], "announce": "PERMISSION_DENIED", "after": []}
    assert probe("alice") == {"located": ["node3"], "announce": "PERMISSION_DENIED",
                              "after": ["node3"]}
    assert "SECURITY: uid" in lab.agent_log(home) and "tried to announce jobs" in \
        lab.agent_log(home)
