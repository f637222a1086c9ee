"""Tests of the multi-node lab itself (deploy/lab/lab.py), which every other integration
test stands on: node identity, each node's own cgroup view, IPv4/IPv6 between nodes, host
names from the lab's hosts file, MUNGE inside a node, and a teardown that leaves nothing.

The root tests bring up a 2-node lab without agents in /run/callerid-lab-test. Nothing here
sends a packet outside the lab's namespaces: every client and server runs inside a node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_PY = REPO / "deploy" / "lab" / "lab.py"
sys.path.insert(0, str(LAB_PY.parent))
import lab as labmod  # noqa: E402

TEST_DIR = Path("/run/callerid-lab-test")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the lab)")


@pytest.fixture(scope="module")
def lab_module() -> Iterator[labmod.Lab]:
    lab = labmod.Lab(TEST_DIR, nodes=2)
    lab.up(agents=False)
    try:
        yield lab
    finally:
        lab.down(purge=True)


@pytest.fixture
def lab(lab_module: labmod.Lab) -> labmod.Lab:
    # test_down_leaves_nothing takes the lab down; whatever runs after it gets it back.
    if not lab_module.is_up():
        lab_module.up(agents=False)
    return lab_module


def _lab_traces() -> list[str]:
    """Everything a lab leaves on the machine while it is up (all empty once down)."""
    traces = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{labmod.SUBTREE}")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    traces += [f"netns {line}" for line in netns.splitlines() if line.startswith("cidlab-")]
    mounts = Path("/proc/self/mountinfo").read_text()
    traces += [f"mount {line}" for line in mounts.splitlines()
               if "cidlab" in line or "callerid-lab" in line]
    if labmod.OWNER_FILE.exists():
        traces.append(str(labmod.OWNER_FILE))
    return traces


def _wait_exec(pid: int, argv0: bytes) -> None:
    """Wait until pid runs argv0: the wrapper chain (sh, nsenter, setpriv, env) is over."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != argv0:
        assert time.monotonic() < deadline, f"pid {pid} never ran {argv0!r}"
        time.sleep(0.005)


# ---------------------------------------------------------------- no root needed


def test_cmd_is_a_pure_argv() -> None:
    lab = labmod.Lab("/nonexistent/lab-dir", nodes=3)
    assert lab.nodes == ["node1", "node2", "node3"]
    assert (lab.ip("node2"), lab.ip("node2", 6)) == ("10.77.0.12", "fd77::12")
    argv = lab.cmd("node2", ["id", "-u"], user="nobody", env={"K": "v w"}, cwd="/tmp")
    assert argv[:2] == ["/bin/sh", "-c"]
    for h in lab.hierarchies:
        assert f"{h.mountpoint}/cidlab/node2/cgroup.procs" in argv[2]
    assert "memory" not in argv[2]
    i = argv.index(labmod.NSENTER)
    assert argv[i + 1:i + 6] == [
        "--net=/run/netns/cidlab-node2",
        "--uts=/nonexistent/lab-dir/ns/node2/uts",
        "--mount=/nonexistent/lab-dir/ns/node2/mnt",
        "--cgroup=/nonexistent/lab-dir/ns/node2/cgroup",
        "--",
    ]
    assert f"--reuid={65534}" in argv and "--init-groups" in argv
    assert argv[argv.index(labmod.ENV):][:3] == [labmod.ENV, "-i", "--chdir=/tmp"]
    assert "USER=nobody" in argv and "K=v w" in argv
    assert argv[-2:] == ["id", "-u"]
    root = lab.cmd("node1", ["true"])
    assert labmod.SETPRIV not in root and "HOME=/root" in root
    with pytest.raises(labmod.LabError):
        lab.cmd("node4", ["true"])
    assert not Path("/nonexistent/lab-dir").exists()


def test_agent_config() -> None:
    conf = labmod.Lab("/nonexistent/lab-dir").agent_config("node2")
    assert 'node_name = "node2"' in conf
    assert 'listen = ["10.77.0.12:7011", "[fd77::12]:7011"]' in conf
    assert 'metrics_listen = "10.77.0.12:9817"' in conf
    assert "memory" not in conf


# ---------------------------------------------------------------------- root


@pytest.mark.root
@needs_root
def test_hostnames(lab: labmod.Lab) -> None:
    for node in lab.nodes:
        assert lab.run(node, ["hostname"]).stdout.strip() == node
        assert lab.run(node, ["uname", "-n"], user="alice").stdout.strip() == node


@pytest.mark.root
@needs_root
def test_each_node_sees_its_own_cgroups(lab: labmod.Lab) -> None:
    for node in lab.nodes:
        lines = lab.run(node, ["cat", "/proc/self/cgroup"]).stdout.splitlines()
        assert any(line.endswith(":freezer:/") for line in lines), lines
        assert any(line.endswith(":pids:/") for line in lines), lines
        assert "0::/" in lines
    # A cgroup made on the host under cidlab/node1 is the top of node1's view only.
    probes = [h.group("node1") / "probe" for h in lab.hierarchies if h.name in
              ("freezer", "unified")]
    for probe in probes:
        probe.mkdir()
    try:
        check = "test -d /sys/fs/cgroup/freezer/probe && test -d /sys/fs/cgroup/unified/probe"
        assert lab.run("node1", ["sh", "-c", check], check=False).returncode == 0
        assert lab.run("node2", ["sh", "-c", check], check=False).returncode != 0
        assert lab.run("node1", ["ls", "/sys/fs/cgroup/freezer"]).stdout.count("cidlab") == 0
    finally:
        for probe in probes:
            probe.rmdir()
    # Seen from the host, a process run in a node sits in cidlab/<node>.
    p = lab.popen("node2", ["sleep", "30"], user="bob")
    try:
        _wait_exec(p.pid, b"sleep")
        host_view = Path(f"/proc/{p.pid}/cgroup").read_text().splitlines()
        assert any(line.endswith(":freezer:/cidlab/node2") for line in host_view), host_view
        assert "0::/cidlab/node2" in host_view
    finally:
        p.kill()
        p.wait()


SERVER = textwrap.dedent("""
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam)
    s.bind((sys.argv[1], 0))
    s.listen()
    print(s.getsockname()[1], flush=True)
    s.settimeout(20)
    c, peer = s.accept()
    data = c.recv(100)
    c.sendall(b"echo " + data)
    c.close()
    print(peer[0], flush=True)
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b"hello")
    print(c.recv(100).decode())
""")


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("family", [4, 6])
def test_tcp_between_nodes(lab: labmod.Lab, family: int) -> None:
    server_ip = lab.ip("node2", family)
    srv = lab.popen("node2", ["python3", "-c", SERVER, server_ip],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().strip()
        assert port.isdigit(), srv.stderr.read() if srv.stderr else ""
        out = lab.run("node1", ["python3", "-c", CLIENT, server_ip, port], timeout=20)
        assert out.stdout.strip() == "echo hello"
        rest, err = srv.communicate(timeout=20)
        assert srv.returncode == 0, err
        assert rest.strip() == lab.ip("node1", family)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


@pytest.mark.root
@needs_root
def test_lab_names_resolve_inside_nodes(lab: labmod.Lab) -> None:
    out = lab.run("node1", ["getent", "hosts", "node2"], user="alice").stdout.split()
    assert out[0] in (lab.ip("node2"), lab.ip("node2", 6)) and "node2" in out
    v4 = lab.run("node1", ["getent", "ahostsv4", "node2"]).stdout
    assert v4.split()[0] == lab.ip("node2")
    v6 = lab.run("node2", ["getent", "ahostsv6", "node1"]).stdout
    assert v6.split()[0] == lab.ip("node1", 6)


@pytest.mark.root
@needs_root
def test_munge_round_trip_in_a_node(lab: labmod.Lab) -> None:
    out = lab.run("node1", ["sh", "-c", "munge -n | unmunge"], user="alice").stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert fields["STATUS"].split()[0] == "Success", out
    uid = int(lab.run("node1", ["id", "-u"], user="alice").stdout)
    assert fields["UID"].split() == ["alice", f"({uid})"], out


@pytest.mark.root
@needs_root
def test_run_user_env_cwd_and_errors(lab: labmod.Lab) -> None:
    out = lab.run("node2", ["sh", "-c", 'id -un; pwd; echo "$FOO|$HOME"'], user="bob",
                  env={"FOO": "a b"}, cwd="/tmp").stdout.splitlines()
    assert out == ["bob", "/tmp", f"a b|{Path('~bob').expanduser()}"]
    # cwd is resolved inside the node: /run/callerid-adopt is the node's own bind mount.
    lab.run("node1", ["touch", "mark"], cwd="/run/callerid-adopt")
    assert (lab.node_dir("node1") / "run" / "mark").exists()
    assert not (lab.node_dir("node2") / "run" / "mark").exists()
    assert lab.run("node2", ["tr", "a-z", "A-Z"], input="piped\n").stdout == "PIPED\n"
    with pytest.raises(labmod.LabCommandError) as err:
        lab.run("node1", ["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    assert err.value.returncode == 3
    assert "to-out" in str(err.value) and "to-err" in str(err.value)
    assert "sh -c" in str(err.value)


@pytest.mark.root
@needs_root
def test_cli(lab: labmod.Lab) -> None:
    base = [sys.executable, str(LAB_PY), "--dir", str(lab.dir)]
    r = subprocess.run([*base, "exec", "node2", "--user", "alice", "--", "sh", "-c",
                        "hostname; id -un; exit 7"], capture_output=True, text=True)
    assert (r.returncode, r.stdout.split()) == (7, ["node2", "alice"]), r.stderr
    st = json.loads(subprocess.run([*base, "status"], capture_output=True, text=True,
                                   check=True).stdout)
    assert st["state"] == "up" and st["munged"]["alive"]
    assert st["nodes"]["node2"]["ipv6"] == "fd77::12"


@pytest.mark.root
@needs_root
def test_second_lab_is_refused(lab: labmod.Lab, tmp_path: Path) -> None:
    other = labmod.Lab(tmp_path / "other-lab")
    with pytest.raises(labmod.LabError, match="another lab is up"):
        other.up(agents=False)
    assert lab.run("node1", ["true"]).returncode == 0  # the first lab is untouched


@pytest.mark.root
@needs_root
def test_down_leaves_nothing(lab: labmod.Lab) -> None:
    # Runs last in this file: takes the lab down and checks the machine is clean.
    assert _lab_traces(), "the lab should be visible while up"
    munged = int((lab.dir / "pids" / "munged.pid").read_text())
    sleepers = [lab.popen("node1", ["sleep", "300"], user="alice"),
                lab.popen("node2", ["sh", "-c", "trap '' TERM; sleep 300 & wait"],
                          start_new_session=True)]
    deadline = time.monotonic() + 5
    while len(lab._lab_pids()) < 4 and time.monotonic() < deadline:  # the `sleep &` too
        time.sleep(0.01)
    pids = lab._lab_pids()
    assert {munged, *(p.pid for p in sleepers)} <= pids
    lab.down()
    for p in sleepers:
        assert p.wait(timeout=5) == -signal.SIGKILL
    assert [pid for pid in pids if labmod._pid_alive(pid)] == []
    assert _lab_traces() == []
    assert not (lab.dir / "ns").exists() and not (lab.dir / "lab.json").exists()
    lab.down()  # idempotent
    assert _lab_traces() == []
