"""The agent as a sysadmin meets it in the lab: clear errors for bad configuration,
missing munged and unreachable peers; health, reflection and metrics endpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root


def run(lab: Any, node: str, *argv: str, user: str | None = None) -> Any:
    return lab.run(node, list(argv), user=user, check=False, timeout=60)


def test_bad_configuration_is_one_clear_line(lab: Any, shared_dir: Path) -> None:
    agent = lab.venv_bin("node-agent")
    r = run(lab, "node1", agent, "--config", str(shared_dir / "absent.toml"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"node-agent: Configuration: {shared_dir}/absent.toml: "
                                "no such configuration file")
    bad = shared_dir / "bad.toml"
    bad.write_text('listen = ["10.77.0.11:411"]\n[cgroup]\nv1 = ["freezer"]\nsubtre = "x"\n')
    r = run(lab, "node1", agent, "--config", str(bad))
    assert r.returncode == 2 and "cgroup.subtre: unknown setting" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_munged_is_named(lab: Any, shared_dir: Path) -> None:
    cfg = shared_dir / "nomunge.toml"
    cfg.write_text('[munge]\nsocket = "/run/munge/nothing-here.socket"\n')
    r = run(lab, "node1", lab.venv_bin("node-agent"), "--config", str(cfg), "--check")
    assert r.returncode == 1
    assert "munged is not running: no socket at /run/munge/nothing-here.socket" in r.stderr
    r = run(lab, "node1", lab.venv_bin("adoptctl"), "--config", str(cfg), "jobs")
    assert r.returncode == 1 and r.stderr.startswith("adoptctl: MUNGE: munged is not reachable")


def test_agent_check_passes_on_a_good_node(lab: Any) -> None:
    r = run(lab, "node1", lab.venv_bin("node-agent"), "--config",
            "/etc/callerid-adopt/agent.toml", "--check")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_listen_address_not_on_this_node(lab: Any, shared_dir: Path) -> None:
    cfg = shared_dir / "wrongaddr.toml"
    cfg.write_text(f'listen = ["{lab.ip("node2")}:7999"]\nsocket = "{shared_dir}/x.sock"\n'
                   f'state_dir = "{shared_dir}/state-x"\n[cgroup]\nv1 = ["freezer"]\n')
    r = run(lab, "node1", lab.venv_bin("node-agent"), "--config", str(cfg))
    assert r.returncode == 1
    assert f"cannot listen on {lab.ip('node2')}:7999" in r.stderr


def test_unreachable_peer_costs_at_most_the_timeout(lab: Any) -> None:
    lab.agent_stop("node2")
    try:
        t0 = time.monotonic()
        r = run(lab, "node1", lab.venv_bin("adoptctl"), "--timeout", "2", "whois",
                f"{lab.ip('node2')}:40000", f"{lab.ip('node1')}:22")
        elapsed = time.monotonic() - t0
        assert r.returncode == 1
        assert r.stderr.startswith("adoptctl: Agent unreachable: ") or \
            r.stderr.startswith("adoptctl: Timeout: "), r.stderr
        assert elapsed < 2 + 3  # the deadline, plus starting the CLI in the node
    finally:
        lab.agent_start("node2")


HEALTH = """
import grpc, sys
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
ch = grpc.insecure_channel(sys.argv[1])
h = health_pb2_grpc.HealthStub(ch).Check(
    health_pb2.HealthCheckRequest(service="callerid_adopt.v1.NodeAgent"), timeout=5)
print(health_pb2.HealthCheckResponse.ServingStatus.Name(h.status))
r = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
print(" ".join(sorted(s.name for s in next(r).list_services_response.service)), flush=True)
# grpc can hang at interpreter exit with a stream still open; this is a probe, not a daemon.
import os; os._exit(0)
"""


def test_health_and_reflection_from_another_node(lab: Any) -> None:
    r = lab.run("node2", [lab.venv_bin("python"), "-c", HEALTH,
                          f"ipv6:[{lab.ip('node1', 6)}]:411"])
    status, services = r.stdout.splitlines()
    assert status == "SERVING"
    assert "callerid_adopt.v1.NodeAgent" in services.split()
    assert "grpc.health.v1.Health" in services.split()


def test_metrics_endpoint_is_local_only(lab: Any) -> None:
    """Metrics are served on the node's loopback: an ordinary user on the node may read
    them, another node (where anyone could ask) cannot reach them."""
    run(lab, "node1", lab.venv_bin("adoptctl"), "jobs")
    code = ("import urllib.request, sys; "
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    far = lab.run("node2", ["/usr/bin/python3", "-c", code,
                            f"http://{lab.ip('node1')}:9817/metrics"], check=False)
    assert far.returncode != 0 and "Connection refused" in far.stderr
    r = lab.run("node1", ["/usr/bin/python3", "-c", code, "http://127.0.0.1:9817/metrics"])
    assert 'callerid_agent_requests_total{code="OK",method="ListJobs"}' in r.stdout
    assert "callerid_agent_request_seconds_bucket" in r.stdout
    assert "callerid_agent_jobs" in r.stdout
    assert "callerid_agent_index_jobs" in r.stdout   # the lab's agents have `nodes`


def test_the_job_index_fills_and_empties(lab: Any) -> None:
    """A job on node2 is announced to its homes, which in a 2-node lab are both nodes:
    node1's index gauge counts it within seconds, and drops it once the job ended."""
    code = ("import urllib.request\n"
            "text = urllib.request.urlopen('http://127.0.0.1:9817/metrics', timeout=5)"
            ".read().decode()\n"
            "print(next(float(line.split()[1]) for line in text.splitlines()\n"
            "           if line.startswith('callerid_agent_index_jobs ')))")

    def gauge_until(want: float) -> float:
        deadline = time.monotonic() + 15
        while True:
            value = float(lab.run("node1", ["/usr/bin/python3", "-c", code]).stdout)
            if value == want or time.monotonic() > deadline:
                return value
            time.sleep(0.3)

    before = gauge_until(0.0)
    run(lab, "node2", lab.venv_bin("adoptctl"), "job", "run", "--id", "ix1", "--user",
        "alice", "--", "/bin/sleep", "1000000")
    try:
        assert gauge_until(before + 1) == before + 1
    finally:
        run(lab, "node2", lab.venv_bin("adoptctl"), "job", "end", "ix1")
    assert gauge_until(before) == before
