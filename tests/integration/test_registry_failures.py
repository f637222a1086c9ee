"""The native job registry when its state dir fails under it, in the lab.

A full file system under the state dir: node2's /var/lib/callerid-adopt becomes a tmpfs of
its own (1 MiB, mounted in node2's mount namespace only) and is filled up. Jobs must still
end (kill first, record after), nothing may be adopted into a job that ended, and the
database must catch up once there is space again. A corrupt jobs.sqlite at agent start
must not stop the agent: the registry is rebuilt from the cgroup tree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, process_alive

pytestmark = pytest.mark.root

STATE = "/var/lib/callerid-adopt"
DB = f"{STATE}/jobs.sqlite"
FAILED = f"cannot record jobs in {DB}"
CAUGHT_UP = f"jobs recorded in {DB} again"

# Fills the file system of argv[1] to the last byte; prints the blocks left (0).
FILL = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
for size in (1 << 16, 4096, 1):
    while True:
        try:
            os.write(fd, bytes(size))
        except OSError:  # ENOSPC: on with smaller writes, to the last byte
            break
print(os.statvfs(os.path.dirname(sys.argv[1])).f_bavail)
"""

# What the database holds, read without writing anything: [[id, state], ...].
ROWS = """
import json, sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
print(json.dumps(db.execute("SELECT id, state FROM jobs ORDER BY id").fetchall()))
"""


def jobs(lab: Any, node: str) -> dict[str, Any]:
    return {j["id"]: j for j in json.loads(adoptctl(lab, node, "jobs", "--json").stdout)}


def job_pids(lab: Any, node: str, job: str, count: int) -> list[int]:
    """The job's pids once it has `count` (its main process may still be forking)."""
    deadline = time.monotonic() + 20
    while True:
        show = json.loads(adoptctl(lab, node, "job", "show", job, "--json").stdout)[0]
        if len(show["pids"]) >= count:
            return list(show["pids"])
        assert time.monotonic() < deadline, show
        time.sleep(0.05)


def end_all(lab: Any) -> None:
    for node in lab.nodes:
        for job in jobs(lab, node):
            adoptctl(lab, node, "job", "end", job, check=False)


def log_since(lab: Any, node: str, mark: int) -> str:
    return str(lab.agent_log(node)[mark:])


def wait_for_log(lab: Any, node: str, mark: int, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_since(lab, node, mark):
        assert time.monotonic() < deadline, f"{node}'s agent never logged {text!r}"
        time.sleep(0.1)


def stored(lab: Any, node: str) -> dict[str, str]:
    out = lab.run(node, ["/usr/bin/python3", "-c", ROWS, DB]).stdout
    return dict(json.loads(out))


@pytest.fixture
def small_state(lab: Any) -> Iterator[None]:
    """node2's state dir on a 1 MiB tmpfs of its own for the test (the agent restarted on
    it, as it keeps its database open); the real one again afterwards."""
    end_all(lab)
    lab.agent_stop("node2")
    lab.run("node2", ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700",
                      "callerid-it-state", STATE])
    try:
        lab.agent_start("node2")
        yield
    finally:
        lab.run("node2", ["rm", "-f", f"{STATE}/fill"])
        end_all(lab)
        lab.agent_stop("node2")
        lab.run("node2", ["umount", STATE])
        lab.agent_start("node2")


def fill_state(lab: Any) -> None:
    left = lab.run("node2", ["/usr/bin/python3", "-c", FILL, f"{STATE}/fill"]).stdout
    assert left.strip() == "0"


def test_job_end_on_a_full_state_dir_kills_and_says_so(lab: Any, small_state: None) -> None:
    adoptctl(lab, "node2", "job", "run", "--id", "F", "--user", "alice", "--",
             "/bin/sh", "-c", "sleep 1000000 & wait")
    pids = job_pids(lab, "node2", "F", 2)
    mark = len(lab.agent_log("node2"))
    fill_state(lab)
    r = adoptctl(lab, "node2", "job", "end", "F", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "job F ended on node2: 2 processes killed\n", "")
    assert not any(process_alive(p) for p in pids)
    assert "F" not in jobs(lab, "node2")
    # The agent knew it could not record that, and said so once.
    assert log_since(lab, "node2", mark).count(FAILED) == 1
    # A new job cannot be recorded before its cgroups exist: refused, with the reason.
    r = adoptctl(lab, "node2", "job", "start", "--id", "N", "--user", "alice", check=False)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == ("adoptctl: Failed: cannot start job N on node2: the job registry in "
                        f"{STATE} cannot record it: database or disk is full\n")
    assert "N" not in jobs(lab, "node2")


def test_a_job_whose_main_process_exits_on_a_full_state_dir_ends(
        lab: Any, small_state: None) -> None:
    adoptctl(lab, "node2", "job", "run", "--id", "A", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    [a_main] = job_pids(lab, "node2", "A", 1)
    time.sleep(0.05)  # B is the newer job: "newest" would pick it
    adoptctl(lab, "node2", "job", "run", "--id", "B", "--user", "alice", "--",
             "/bin/sh", "-c", "sleep 1000000 & wait")
    b_main, b_child = job_pids(lab, "node2", "B", 2)
    mark = len(lab.agent_log("node2"))
    fill_state(lab)
    lab.run("node2", ["kill", "-KILL", str(b_main)])
    # B ends: what was left in it is killed, and it is gone from the list.
    deadline = time.monotonic() + 20
    while "B" in jobs(lab, "node2"):
        assert time.monotonic() < deadline, f"job B never ended: {jobs(lab, 'node2')['B']}"
        time.sleep(0.1)
    assert not process_alive(b_child)
    # alice logs in from outside any job: her one job left is A; nothing lands in B.
    r = lab.run("node1", lab.ssh_argv("node2", ["cat", "/proc/self/cgroup"]), user="alice",
                check=False)
    assert r.returncode == 0, r.stderr
    assert "0::/callerid/job_A/adopted" in r.stdout.splitlines(), r.stdout
    assert log_since(lab, "node2", mark).count(FAILED) == 1
    # Space again: the database catches up, with one line; B is not in it.
    lab.run("node2", ["rm", f"{STATE}/fill"])
    wait_for_log(lab, "node2", mark, CAUGHT_UP)
    assert stored(lab, "node2") == {"A": "running"}
    log = log_since(lab, "node2", mark)
    assert (log.count(FAILED), log.count(CAUGHT_UP)) == (1, 1), log
    # A restart finds exactly what was running: A, with its main process; B stays gone.
    lab.agent_stop("node2")
    lab.agent_start("node2")
    after = jobs(lab, "node2")
    assert list(after) == ["A"] and after["A"]["main_pid"] == a_main
    assert process_alive(a_main)


def test_a_corrupt_database_at_start_is_rebuilt_from_the_cgroup_tree(lab: Any) -> None:
    end_all(lab)
    adoptctl(lab, "node1", "job", "run", "--id", "C", "--user", "alice", "--",
             "/bin/sh", "-c", "sleep 1000000 & wait")
    pids = job_pids(lab, "node1", "C", 2)
    lab.agent_stop("node1")
    db = lab.node_dir("node1") / "state" / "jobs.sqlite"  # the node's state dir, seen here
    db.write_bytes(b"not a database, whatever it was\n" * 256)
    mark = len(lab.agent_log("node1"))
    try:
        lab.agent_start("node1")  # waits for READY=1: raises if the agent cannot start
        # One clear line; the file is kept aside for a post-mortem.
        log = log_since(lab, "node1", mark)
        [aside] = [p for p in db.parent.glob("jobs.sqlite.corrupt-*") if p.name[-1].isdigit()]
        line = (f"ERROR node_agent.jobs.native: the job registry {DB} is corrupt (file is not a "
                f"database): moved to {aside.name}; rebuilding it from the cgroup tree")
        errors = [x for x in log.splitlines() if " ERROR " in x or "Traceback" in x]
        assert len(errors) == 1 and errors[0].endswith(line), log
        # The running job is back, alice's, with its processes; and it can be ended.
        c = json.loads(adoptctl(lab, "node1", "job", "show", "C", "--json").stdout)[0]
        assert (c["user"], c["state"], sorted(c["pids"])) == ("alice", "running", sorted(pids))
        r = adoptctl(lab, "node1", "job", "end", "C")
        assert r.stdout == "job C ended on node1: 2 processes killed\n"
        assert not any(process_alive(p) for p in pids)
    finally:
        for p in db.parent.glob("jobs.sqlite.corrupt-*"):
            p.unlink()
        if lab.agent_pid("node1") is None:
            db.unlink(missing_ok=True)
            lab.agent_start("node1")
        end_all(lab)
