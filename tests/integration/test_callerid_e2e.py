"""Caller-ID across lab nodes, as a user and an admin meet it.

Jobs of alice on node1 hold TCP connections to a listener on node2 (IPv4, IPv6, a
dual-stack [::] listener that sees IPv4-mapped addresses, and a client-side mapped
socket). On node2, `adoptctl whois`, given the connection exactly as node2 sees it,
must name the right job through node1's agent; a second job of alice must not be
confused with the first; a process in no job is unknown; bob asking about alice's
connection gets unknown and node1 logs a security line; the jobs survive a restart
and a kill -9 of the agent; `adoptctl job end` leaves nothing of the job alive.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import adoptctl, process_alive, wait_for

pytestmark = pytest.mark.root

PORTS = {"v4": 5000, "v6": 5001, "dual": 5002}








@pytest.fixture(scope="module")
def scene(lab: Any, shared_dir: Path) -> Any:
    """node2 listens; alice's jobs 101 and 102 and a job-less process on node1 connect."""
    n2v4, n2v6 = lab.ip("node2", 4), lab.ip("node2", 6)
    accepted = shared_dir / "accepted"
    listener = lab.popen("node2", ["/usr/bin/python3", str(shared_dir / "listener.py"),
                                   str(accepted), f"{n2v4}:{PORTS['v4']}",
                                   f"[{n2v6}]:{PORTS['v6']}", f"[::]:{PORTS['dual']}"])
    wait_for(Path(str(accepted) + ".ready"))
    targets = [f"{n2v4}:{PORTS['v4']}", f"[{n2v6}]:{PORTS['v6']}", f"{n2v4}:{PORTS['dual']}",
               f"mapped:{n2v4}:{PORTS['v4']}"]
    holders: dict[str, Path] = {}
    for job in ("101", "102"):
        out = shared_dir / f"conns-{job}"
        adoptctl(lab, "node1", "job", "run", "--id", job, "--user", "alice",
                 "--output", str(shared_dir / f"job-{job}.log"), "--",
                 "/usr/bin/python3", str(shared_dir / "holder.py"), str(out), *targets)
        holders[job] = out
    out = shared_dir / "conns-nojob"
    nojob = lab.popen("node1", ["/usr/bin/python3", str(shared_dir / "holder.py"), str(out),
                                *targets], user="alice")
    holders["nojob"] = out
    for path in holders.values():
        wait_for(path)
    time.sleep(0.3)  # let the listener record the last accepts
    # node2's view of every connection, keyed by node1's (client) port.
    seen = {}
    for line in accepted.read_text().splitlines():
        src_ip, src_port, dst_ip, dst_port = line.split()
        seen[int(src_port)] = (src_ip, int(src_port), dst_ip, int(dst_port))
    conns: dict[str, list[tuple[str, tuple[str, int, str, int]]]] = {}
    pids: dict[str, list[int]] = {}
    for owner, path in holders.items():
        conns[owner] = []
        for line in path.read_text().splitlines():
            if line.startswith("pids "):
                pids[owner] = [int(p) for p in line.split()[1:]]
                continue
            _lip, lport, _rip, _rport, kind = line.split()
            conns[owner].append((kind, seen[int(lport)]))
    yield {"conns": conns, "pids": pids}
    listener.kill()
    nojob.kill()
    listener.wait()
    nojob.wait()
    for job in ("101", "102"):
        adoptctl(lab, "node1", "job", "end", job, check=False)


def whois(lab: Any, conn: tuple[str, int, str, int], user: str | None = None,
          node: str = "node2") -> Any:
    src_ip, src_port, dst_ip, dst_port = conn

    def ep(ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    return adoptctl(lab, node, "whois", ep(src_ip, src_port), ep(dst_ip, dst_port), "--json",
                    user=user, check=False)


def test_whois_names_the_job_for_every_address_family(lab: Any, scene: Any) -> None:
    kinds = set()
    for job in ("101", "102"):
        for kind, conn in scene["conns"][job]:
            r = whois(lab, conn)
            assert r.returncode == 0, (kind, conn, r.stdout, r.stderr)
            answer = json.loads(r.stdout)
            assert answer["job_id"] == job, (kind, conn, answer)
            assert answer["node"] == "node1"
            assert answer["user"] == "alice"
            assert answer["pid"] == scene["pids"][job][0], answer
            assert answer["method"].startswith("netlink")
            kinds.add((kind, ":" in conn[0], conn[0].startswith("::ffff:")))
    # Both plain families and the mapped form were really exercised.
    assert ("v4", False, False) in kinds
    assert ("v6", True, False) in kinds
    assert any(mapped for (_k, _v6, mapped) in kinds), kinds


def test_job_less_process_is_unknown(lab: Any, scene: Any) -> None:
    for kind, conn in scene["conns"]["nojob"]:
        r = whois(lab, conn)
        assert r.returncode == 1, (kind, r.stdout, r.stderr)
        answer = json.loads(r.stdout)
        assert answer["found"] is False and answer["job_id"] is None
        assert answer["pid"] == scene["pids"]["nojob"][0]  # root sees the pid, but no job


def test_user_sees_own_job_other_user_gets_unknown_and_a_security_line(
        lab: Any, scene: Any) -> None:
    _kind, conn = scene["conns"]["101"][0]
    r = whois(lab, conn, user="alice")
    assert r.returncode == 0 and json.loads(r.stdout)["job_id"] == "101", r.stderr
    r = whois(lab, conn, user="bob")
    assert r.returncode == 1, r.stdout
    answer = json.loads(r.stdout)
    assert answer["job_id"] is None and answer["pid"] is None and answer["steps"] == []
    log = lab.agent_log("node1")
    bob_uid = int(lab.run("node1", ["id", "-u", "bob"]).stdout)
    assert f"SECURITY: uid {bob_uid} asked node1" in log and "job 101" in log


def test_someone_elses_connection_is_answered_like_a_missing_one(lab: Any, scene: Any) -> None:
    """bob asks about alice's connections (in a job, and job-less) and about one that does
    not exist: one and the same answer, but for the connection asked about."""
    missing = (lab.ip("node1"), 9, lab.ip("node2"), 9)
    answers = []
    for conn in (scene["conns"]["101"][0][1], scene["conns"]["nojob"][0][1], missing):
        r = whois(lab, conn, user="bob")
        assert r.returncode == 1, r.stdout + r.stderr
        answer = json.loads(r.stdout)
        del answer["connection"]
        answers.append(answer)
    assert answers[0] == answers[1] == answers[2], answers
    assert answers[0]["steps"] == [] and answers[0]["pid"] is None


def test_whois_human_output(lab: Any, scene: Any) -> None:
    _kind, (src_ip, src_port, dst_ip, dst_port) = scene["conns"]["102"][0]
    r = adoptctl(lab, "node2", "whois", f"{src_ip}:{src_port}", f"{dst_ip}:{dst_port}")
    assert "job         102" in r.stdout and "steps" in r.stdout and "sock_diag" in r.stdout


def test_jobs_survive_agent_restart_and_kill_9(lab: Any, scene: Any) -> None:
    for how in (signal.SIGTERM, signal.SIGKILL):
        lab.agent_stop("node1", sig=how)
        assert lab.agent_pid("node1") is None or not process_alive(lab.agent_pid("node1"))
        lab.agent_start("node1")
        jobs = json.loads(adoptctl(lab, "node1", "jobs", "--json").stdout)
        assert sorted(j["id"] for j in jobs) == ["101", "102"], (how, jobs)
        for j in jobs:
            assert set(scene["pids"][j["id"]]) <= set(j["pids"]), (how, j)
        # ...and caller ID still answers from the recovered registry.
        _kind, conn = scene["conns"]["102"][1]
        assert json.loads(whois(lab, conn).stdout)["job_id"] == "102"


def test_job_end_leaves_no_process(lab: Any, scene: Any) -> None:
    show = json.loads(adoptctl(lab, "node1", "job", "show", "101", "--json").stdout)[0]
    pids = show["pids"]
    assert set(scene["pids"]["101"]) <= set(pids) and len(pids) >= 2
    r = adoptctl(lab, "node1", "job", "end", "101")
    assert "job 101 ended on node1" in r.stdout
    for pid in pids:
        assert not process_alive(pid), pid
    jobs = json.loads(adoptctl(lab, "node1", "jobs", "--json").stdout)
    assert [j["id"] for j in jobs] == ["102"]
    r = adoptctl(lab, "node1", "job", "show", "101", check=False)
    assert r.returncode == 1 and "Not found" in r.stderr
    # Its connection is gone with it: caller ID no longer names job 101.
    _kind, conn = scene["conns"]["101"][0]
    assert json.loads(whois(lab, conn).stdout)["job_id"] is None


def test_main_process_exit_ends_the_job(lab: Any) -> None:
    adoptctl(lab, "node1", "job", "run", "--id", "short", "--user", "bob", "--",
             "/bin/sh", "-c", "sleep 100000 & sleep 0.5")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        jobs = json.loads(adoptctl(lab, "node1", "jobs", "--json").stdout)
        if "short" not in [j["id"] for j in jobs]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("job 'short' did not end when its main process exited")


def test_hostile_job_ids_are_refused(lab: Any) -> None:
    for bad in ("../x", "a/b", "x" * 4096):
        r = adoptctl(lab, "node1", "job", "start", "--id", bad, "--user", "alice", check=False)
        assert r.returncode == 1 and "Invalid argument" in r.stderr, r.stderr
    listing = lab.run("node1", ["ls", "/sys/fs/cgroup/freezer/callerid"], check=False).stdout
    assert "x" not in listing.split()


def test_same_job_id_on_several_nodes(lab: Any) -> None:
    for node in ("node1", "node2"):
        adoptctl(lab, node, "job", "run", "--id", "777", "--user", "bob", "--",
                 "/bin/sleep", "100000")
    try:
        for node in ("node1", "node2"):
            jobs = json.loads(adoptctl(lab, node, "jobs", "--json").stdout)
            mine = [j for j in jobs if j["id"] == "777"]
            assert len(mine) == 1 and mine[0]["node"] == node and mine[0]["user"] == "bob"
        r = adoptctl(lab, "node1", "job", "run", "--id", "777", "--user", "bob", "--", "true",
                     check=False)
        assert r.returncode == 1 and "already exists on node1" in r.stderr
    finally:
        for node in ("node1", "node2"):
            adoptctl(lab, node, "job", "end", "777", check=False)
