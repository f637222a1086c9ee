"""Tests of the multi-node lab itself (deploy/lab/lab.py), which every other integration
test stands on: node identity, each node's own cgroup view, IPv4/IPv6 between nodes, host
names from the lab's hosts file, MUNGE inside a node, sshd logins between nodes with the
lab's PAM stacks, the /dev/log listener, black-holed ports, two lab instances side by side,
and a teardown that leaves nothing.

The root tests bring up a 2-node lab named ``cidlabt`` without agents in
/run/callerid-lab-test (its own name: it can run while another suite uses the default lab).
Nothing here sends a packet outside the lab's namespaces: every client and server runs
inside a node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lab as labmod

REPO = Path(__file__).resolve().parents[2]
LAB_PY = REPO / "deploy" / "lab" / "lab.py"

TEST_DIR = Path("/run/callerid-lab-test")
TEST_NAME = "cidlabt"
OTHER_DIR = Path("/run/callerid-lab-test2")
OTHER_NAME = "cidlabt2"


@pytest.fixture(scope="module")
def lab_module() -> Iterator[labmod.Lab]:
    lab = labmod.Lab(TEST_DIR, nodes=2, name=TEST_NAME)
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


def _lab_traces(lab: labmod.Lab) -> list[str]:
    """Everything one lab instance leaves on the machine while up (all empty once down)."""
    traces = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{lab.name}")]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in netns.splitlines() if line.strip()]
    traces += [f"netns {n}" for n in names if lab._is_my_netns(n)]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4]
        if (target == str(lab.dir) or target.startswith(f"{lab.dir}/")
                or target.startswith(f"/run/netns/{lab.name}-")):
            traces.append(f"mount {line}")
    if lab.owner_file.exists():
        traces.append(str(lab.owner_file))
    return traces


def _logged(lab: labmod.Lab, text: str) -> Callable[[], bool]:
    """For _wait_for: has the lab's /dev/log listener got `text` yet?"""
    return lambda: text in lab.syslog()


def _wait_exec(pid: int, argv0: bytes) -> None:
    """Wait until pid runs argv0: the wrapper chain (sh, nsenter, setpriv, env) is over."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != argv0:
        assert time.monotonic() < deadline, f"pid {pid} never ran {argv0!r}"
        time.sleep(0.005)


def _wait_for(what: str, fn: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- no root needed


def test_cmd_is_a_pure_argv() -> None:
    lab = labmod.Lab("/nonexistent/lab-dir", nodes=3)
    assert lab.name == "cidlab"
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


def test_instance_names() -> None:
    default = labmod.Lab()
    if not os.environ.get("CALLERID_LAB_DIR"):
        assert default.dir == Path("/run/callerid-lab")
    assert default.owner_file == labmod.OWNER_FILE == Path("/run/callerid-lab.owner")
    lab = labmod.Lab(nodes=2, name="lab-b2")
    if not os.environ.get("CALLERID_LAB_DIR"):
        assert lab.dir == Path("/run/lab-b2")
    assert lab.owner_file == Path("/run/callerid-lab.lab-b2.owner")
    assert lab.netns("head") == "lab-b2-head" and lab.netns("node2") == "lab-b2-node2"
    argv = lab.cmd("node1", ["true"])
    assert "--net=/run/netns/lab-b2-node1" in argv
    for h in lab.hierarchies:
        assert lab.cgroup(h, "node1") == h.mountpoint / "lab-b2" / "node1"
        assert f"{h.mountpoint}/lab-b2/node1/cgroup.procs" in argv[2]
    # exact netns names only: another instance whose name extends ours is not ours
    assert lab._is_my_netns("lab-b2-node12") and lab._is_my_netns("lab-b2-head")
    assert not lab._is_my_netns("lab-b2-x-node1") and not lab._is_my_netns("lab-b2-nodes")
    assert not labmod.Lab(name="cidlab")._is_my_netns("cidlabt-node1")
    for bad in ("", "Lab", "1lab", "lab_x", "lab-", "a--b", "lab.x", "x" * 25):
        with pytest.raises(ValueError):
            labmod.Lab(name=bad)


def test_agent_config() -> None:
    conf = labmod.Lab("/nonexistent/lab-dir").agent_config("node2")
    assert 'node_name = "node2"' in conf
    assert 'listen = ["10.77.0.12:411", "[fd77::12]:411"]' in conf
    assert 'metrics_listen = "127.0.0.1:9817"' in conf
    assert "memory" not in conf


def test_ssh_config_and_pam_stacks() -> None:
    lab = labmod.Lab("/nonexistent/lab-dir", name="x")
    assert [lab.pam_service("node2", v) for v in ("adopt", "none", "noop")] == [
        "lab-sshd-node2", "lab-sshd-node2-none", "lab-sshd-node2-noop"]
    conf = lab.sshd_config("node2", "none").splitlines()
    for line in ("ListenAddress 10.77.0.12:2201", "ListenAddress [fd77::12]:2201",
                 "UsePAM yes", "UseDNS no", "PasswordAuthentication no",
                 "PermitRootLogin prohibit-password",
                 "AuthorizedKeysFile /nonexistent/lab-dir/ssh/authorized_keys/%u",
                 "HostKey /nonexistent/lab-dir/nodes/node2/ssh/ssh_host_ed25519_key"):
        assert line in conf
    adopt = lab.pam_stack("node2", "adopt", ["action_generic_failure=allow"]).splitlines()
    account = [line for line in adopt if "account" in line]
    assert account[-1].split()[:2] == ["-account", "required"]
    assert account[-1].split()[3:] == [
        str(REPO / "pam" / "pam_adopt.py"), "service=lab-sshd-node2",
        "action_generic_failure=allow"]
    assert account[-1].split()[2].endswith("/security/pam_python.so")
    text = "\n".join(line for line in adopt if not line.startswith("#"))
    for absent in ("pam_systemd", "pam_selinux", "pam_motd", "pam_mail",
                   "@include common-session\n"):
        assert absent not in text + "\n"
    assert "@include common-session-noninteractive" in text
    assert "pam_python" not in lab.pam_stack("node2", "none")
    noop = lab.pam_stack("node2", "noop")
    assert str(REPO / "deploy" / "lab" / "pam_noop.py") in noop and "pam_adopt" not in noop
    with pytest.raises(ValueError):
        lab.pam_stack("node2", "adopt", ["two words"])
    assert lab.ssh_argv("node2", ["hostname"]) == [labmod.SSH, "10.77.0.12", "hostname"]
    assert lab.ssh_argv("node2", ["sh", "-c", "echo $X"], port=2201, family=6,
                        options=["ConnectTimeout=3"]) == [
        labmod.SSH, "-p", "2201", "-o", "ConnectTimeout=3", "fd77::12", "sh -c 'echo $X'"]
    assert lab.ssh_argv("node1", "true", family=0)[-2:] == ["node1", "true"]


def test_slurm_config_and_pam_slurm_stack() -> None:
    lab = labmod.Lab("/nonexistent/lab-dir", nodes=2, name="x")
    conf = lab.slurm_config().splitlines()
    for line in ("ClusterName=x", "SlurmctldHost=head(10.77.0.1)",
                 "AuthInfo=socket=/nonexistent/lab-dir/munge/run/munge.socket.2",
                 "SlurmdSpoolDir=/nonexistent/lab-dir/slurm/spool/%n",
                 "ProctrackType=proctrack/cgroup", "TaskPlugin=task/none",
                 "PrologFlags=contain", "JobAcctGatherType=jobacct_gather/linux",
                 "JobAcctGatherFrequency=task=1"):
        assert line in conf
    assert [line.split()[:2] for line in conf if line.startswith("NodeName=")] == [
        ["NodeName=node1", "NodeAddr=10.77.0.11"], ["NodeName=node2", "NodeAddr=10.77.0.12"]]
    cg = lab.cgroup_config().splitlines()
    assert "CgroupPlugin=cgroup/v1" in cg and "CgroupAutomount=no" in cg
    constrain = [line for line in cg if line.startswith("Constrain")]
    assert constrain and all(line.endswith("=no") for line in constrain)
    stack = lab.pam_stack("node2", "adopt", ["action_unknown=deny"], module="slurm")
    account = [line for line in stack.splitlines() if "account" in line]
    assert account[-1].split() == [
        "account", "required", "/lib/security/pam_slurm_adopt.so", "service=lab-sshd-node2",
        "nodename=node2", "action_unknown=deny"]
    assert "pam_python" not in stack
    given = lab.pam_stack("node2", "adopt", ["nodename=other"], module="slurm")
    assert "nodename=node2" not in given and "nodename=other" in given
    with pytest.raises(ValueError):
        lab.pam_stack("node2", "noop", module="slurm")
    with pytest.raises(ValueError):
        lab.pam_stack("node2", "adopt", module="pam_unix")


def test_format_syslog() -> None:
    line = labmod.format_syslog(b"<86>Nov 22 00:01:02 pam_adopt[42]: alice: hi\n", "node2",
                                now=0.25)
    assert line.endswith(" node2 authpriv.info pam_adopt[42]: alice: hi\n"), line
    assert ".250 node2" in line
    assert labmod.format_syslog(b"no header", "?").endswith(" ? user.notice no header\n")


# ---------------------------------------------------------------------- root


@pytest.mark.root
def test_hostnames(lab: labmod.Lab) -> None:
    for node in lab.nodes:
        assert lab.run(node, ["hostname"]).stdout.strip() == node
        assert lab.run(node, ["uname", "-n"], user="alice").stdout.strip() == node


@pytest.mark.root
def test_each_node_sees_its_own_cgroups(lab: labmod.Lab) -> None:
    for node in lab.nodes:
        lines = lab.run(node, ["cat", "/proc/self/cgroup"]).stdout.splitlines()
        assert any(line.endswith(":freezer:/") for line in lines), lines
        assert any(line.endswith(":pids:/") for line in lines), lines
        assert "0::/" in lines
    # A cgroup made on the host under <name>/node1 is the top of node1's view only.
    probes = [lab.cgroup(h, "node1") / "probe" for h in lab.hierarchies if h.name in
              ("freezer", "unified")]
    for probe in probes:
        probe.mkdir()
    try:
        check = "test -d /sys/fs/cgroup/freezer/probe && test -d /sys/fs/cgroup/unified/probe"
        assert lab.run("node1", ["sh", "-c", check], check=False).returncode == 0
        assert lab.run("node2", ["sh", "-c", check], check=False).returncode != 0
        assert lab.run("node1", ["ls", "/sys/fs/cgroup/freezer"]).stdout.count(lab.name) == 0
    finally:
        for probe in probes:
            probe.rmdir()
    # Seen from the host, a process run in a node sits in <name>/<node>.
    p = lab.popen("node2", ["sleep", "30"], user="bob")
    try:
        _wait_exec(p.pid, b"sleep")
        host_view = Path(f"/proc/{p.pid}/cgroup").read_text().splitlines()
        assert any(line.endswith(f":freezer:/{lab.name}/node2") for line in host_view), \
            host_view
        assert f"0::/{lab.name}/node2" in host_view
    finally:
        p.kill()
        p.wait()


SERVER = textwrap.dedent("""
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam)
    s.bind((sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
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

# Listens on (ip, port) for every family given and accepts until killed.
LISTENER = textwrap.dedent("""
    import socket, sys, selectors
    sel = selectors.DefaultSelector()
    for ip in sys.argv[2:]:
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, int(sys.argv[1])))
        s.listen()
        sel.register(s, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            c, _ = key.fileobj.accept()
            c.close()
""")

# Prints "ok", "refused" or "timeout" for a TCP connect to (ip, port) within 1 s.
PROBE = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        print("ok")
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
""")


# Logs argv[1] to /dev/log as "labtest[pid]" and stays alive a moment (the listener reads
# the sender's /proc/<pid>/ns/uts).
SAY = ("import syslog, sys, time; syslog.openlog('labtest', syslog.LOG_PID); "
       "syslog.syslog(sys.argv[1]); time.sleep(0.3)")


def _count_cmdlines(lab: labmod.Lab, prefix: bytes) -> int:
    n = 0
    for pid in lab._lab_pids():
        with contextlib.suppress(OSError):
            n += Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix)
    return n


def _probe(lab: labmod.Lab, node: str, ip: str, port: int) -> str:
    return str(lab.run(node, ["python3", "-c", PROBE, ip, str(port)], timeout=20).stdout.strip())


@pytest.mark.root
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
def test_lab_names_resolve_inside_nodes(lab: labmod.Lab) -> None:
    out = lab.run("node1", ["getent", "hosts", "node2"], user="alice").stdout.split()
    assert out[0] in (lab.ip("node2"), lab.ip("node2", 6)) and "node2" in out
    v4 = lab.run("node1", ["getent", "ahostsv4", "node2"]).stdout
    assert v4.split()[0] == lab.ip("node2")
    v6 = lab.run("node2", ["getent", "ahostsv6", "node1"]).stdout
    assert v6.split()[0] == lab.ip("node1", 6)


@pytest.mark.root
def test_munge_round_trip_in_a_node(lab: labmod.Lab) -> None:
    out = lab.run("node1", ["sh", "-c", "munge -n | unmunge"], user="alice").stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert fields["STATUS"].split()[0] == "Success", out
    uid = int(lab.run("node1", ["id", "-u"], user="alice").stdout)
    assert fields["UID"].split() == ["alice", f"({uid})"], out


@pytest.mark.root
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
def test_cli(lab: labmod.Lab) -> None:
    base = [sys.executable, str(LAB_PY), "--dir", str(lab.dir)]
    r = subprocess.run([*base, "exec", "node2", "--user", "alice", "--", "sh", "-c",
                        "hostname; id -un; exit 7"], capture_output=True, text=True)
    assert (r.returncode, r.stdout.split()) == (7, ["node2", "alice"]), r.stderr
    st = json.loads(subprocess.run([*base, "status"], capture_output=True, text=True,
                                   check=True).stdout)
    assert st["state"] == "up" and st["munged"]["alive"] and st["name"] == lab.name
    assert st["nodes"]["node2"]["ipv6"] == "fd77::12"
    assert all(st["nodes"]["node1"]["sshd_pids"].values())
    # --name alone finds the dir through the owner file
    st = json.loads(subprocess.run([sys.executable, str(LAB_PY), "--name", lab.name, "status"],
                                   capture_output=True, text=True, check=True).stdout)
    assert st["dir"] == str(lab.dir)


@pytest.mark.root
def test_second_lab_is_refused(lab: labmod.Lab, tmp_path: Path) -> None:
    other = labmod.Lab(tmp_path / "other-lab", name=lab.name)
    with pytest.raises(labmod.LabError, match=f"another lab named '{lab.name}' is up"):
        other.up(agents=False)
    same_dir = labmod.Lab(lab.dir, name="cidlabt-other")
    with pytest.raises(labmod.LabError, match=f"holds the lab '{lab.name}'"):
        same_dir.up(agents=False)
    assert not same_dir.owner_file.exists()
    assert lab.run("node1", ["true"]).returncode == 0  # the first lab is untouched
    assert lab.run("node1", lab.ssh_argv("node2", ["true"], port=2201)).returncode == 0


# ------------------------------------------------------------------- ssh + PAM


def _ssh(lab: labmod.Lab, src: str, dst: str, argv: list[str], *, user: str = "alice",
         port: int = 22, family: int = 4,
         timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = lab.run(src, lab.ssh_argv(dst, argv, port=port, family=family), user=user,
                check=False, timeout=timeout)
    return r, time.monotonic() - t0


@pytest.mark.root
def test_ssh_without_pam_adopt(lab: labmod.Lab) -> None:
    """Port 2201 (`none` service): logins work without any agent, by name, IPv4, IPv6."""
    for family in (0, 4, 6):
        r, _ = _ssh(lab, "node1", "node2", ["hostname"], port=2201, family=family)
        assert (r.returncode, r.stdout.strip()) == (0, "node2"), r.stderr
        assert r.stderr == ""  # no prompt, no host key warning
    # the plain command line a user would type, from every user and both directions
    for user in labmod.SSH_USERS:
        r = lab.run("node2", ["ssh", "-p", "2201", "node1", "id -un; hostname"], user=user)
        assert r.stdout.split() == [user, "node1"], r.stderr
    r = lab.run("node1", ["ssh", "-p", "2201", "fd77::12", "echo", "$SSH_CONNECTION"])
    assert r.stdout.split()[0::2] == ["fd77::11", "fd77::12"] and r.stdout.split()[3] == "2201"
    # the session runs in node2's cgroup, seen from node2 as its root
    r = lab.run("node1", lab.ssh_argv("node2", ["cat", "/proc/self/cgroup"], port=2201))
    assert any(line.endswith(":freezer:/") for line in r.stdout.splitlines()), r.stdout
    # the PAM service is per node: pam_unix logs it, and the listener names the node
    _wait_for("syslog lines of both nodes", lambda: (
        "node2 authpriv.info lab-sshd-node2-none: pam_unix(lab-sshd-node2-none:session): "
        "session opened for user alice" in lab.syslog()
        and "node1 authpriv.info lab-sshd-node1-none: pam_unix(lab-sshd-node1-none:session): "
        "session opened for user bob" in lab.syslog()))
    assert "Accepted publickey for alice from 10.77.0.11" in lab.sshd_log("node2", "none")


@pytest.mark.root
def test_ssh_noop_module(lab: labmod.Lab) -> None:
    r, _ = _ssh(lab, "node1", "node2", ["hostname"], port=2202)
    assert (r.returncode, r.stdout.strip()) == (0, "node2"), r.stderr
    r, _ = _ssh(lab, "node2", "node1", ["hostname"], port=2202, family=6, user="bob")
    assert (r.returncode, r.stdout.strip()) == (0, "node1"), r.stderr
    _wait_for("syslog", lambda: "pam_unix(lab-sshd-node2-noop:session): session opened for "
              "user alice" in lab.syslog())


@pytest.mark.root
def test_pam_adopt_denies_without_agent(lab: labmod.Lab) -> None:
    """No agent runs: pam_adopt cannot ask one and denies (action_generic_failure=deny)."""
    for family in (4, 6):
        r, took = _ssh(lab, "node1", "node2", ["hostname"], family=family)
        assert r.returncode == 255 and r.stdout == "", r
        assert "Access denied by pam_adopt" in r.stderr, r.stderr
        assert took < 2.0 + 1.5  # within the module's default timeout (2 s)
    _wait_for("pam_adopt's syslog line", lambda: (
        "node2 authpriv.err pam_adopt[" in lab.syslog()
        and "alice: cannot reach the agent at /run/callerid-adopt/admission.sock"
        in lab.syslog()))
    assert "Access denied for user alice by PAM account configuration" in lab.sshd_log("node2")
    # root is ignored by pam_adopt (PAM_IGNORE) and gets in
    r, _ = _ssh(lab, "node1", "node2", ["hostname"], user="root")
    assert (r.returncode, r.stdout.strip()) == (0, "node2"), r.stderr


@pytest.mark.root
def test_set_pam(lab: labmod.Lab) -> None:
    pam_file = lab.node_dir("node2") / "pam.d" / lab.pam_service("node2")
    try:
        lab.set_pam("node2", ["action_generic_failure=allow"])
        adopt = [line for line in pam_file.read_text().splitlines() if "pam_adopt" in line]
        assert len(adopt) == 1 and adopt[0].startswith("-account")
        assert adopt[0].endswith("service=lab-sshd-node2 action_generic_failure=allow")
        r, _ = _ssh(lab, "node1", "node2", ["hostname"])
        assert (r.returncode, r.stdout.strip()) == (0, "node2"), r.stderr
        # node1 keeps its own file: still denied there
        r, _ = _ssh(lab, "node2", "node1", ["hostname"])
        assert r.returncode == 255 and "Access denied by pam_adopt" in r.stderr
        # an agent that accepts but never answers: denied after the module's timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            path = lab.node_dir("node2") / "run" / "slow.sock"
            slow.bind(str(path))
            slow.listen(8)
            lab.set_pam("node2", ["socket=/run/callerid-adopt/slow.sock", "timeout=1"])
            r, took = _ssh(lab, "node1", "node2", ["hostname"])
            path.unlink()
        assert r.returncode == 255 and "Access denied by pam_adopt" in r.stderr, r
        assert 1.0 <= took < 1.0 + 3.0, took
        _wait_for("the timeout in syslog", lambda: "no answer from the agent at "
                  "/run/callerid-adopt/slow.sock within 1 s" in lab.syslog())
    finally:
        lab.set_pam("node2")
    assert "action_generic_failure" not in pam_file.read_text()
    r, _ = _ssh(lab, "node1", "node2", ["hostname"])
    assert r.returncode == 255


@pytest.mark.root
def test_syslog_names_the_sender(lab: labmod.Lab) -> None:
    if lab.status()["syslog"]["mode"] != "lab":
        assert "belongs to a syslog daemon" in lab.syslog()
        pytest.skip("/dev/log is a real syslog daemon's here")
    lab.run("node1", ["python3", "-c", SAY, "MARK-node1"], user="bob")
    subprocess.run([sys.executable, "-c", SAY, "MARK-host"], check=True)
    _wait_for("both marks", lambda: "MARK-node1" in lab.syslog() and "MARK-host" in lab.syslog())
    lines = lab.syslog().splitlines()
    assert any(" node1 user.info labtest[" in line and line.endswith("MARK-node1")
               for line in lines), lines[-5:]
    assert any(" host user.info labtest[" in line and line.endswith("MARK-host")
               for line in lines), lines[-5:]


@pytest.mark.root
def test_blackhole(lab: labmod.Lab) -> None:
    srv = lab.popen("node1", ["python3", "-c", LISTENER, str(labmod.AGENT_PORT),
                              lab.ip("node1"), lab.ip("node1", 6)],
                    stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        for family in (4, 6):
            assert _probe(lab, "node2", lab.ip("node1", family), labmod.AGENT_PORT) == "ok"
        lab.blackhole("node1")
        assert lab.blackholes() == {"node1": [labmod.AGENT_PORT]}
        for family in (4, 6):
            assert _probe(lab, "node2", lab.ip("node1", family), labmod.AGENT_PORT) == "timeout"
        # only that port and only that node: sshd on node1 still answers
        assert lab.run("node2", lab.ssh_argv("node1", ["true"], port=2201)).returncode == 0
        tables = subprocess.run([labmod.NSENTER, f"--net={lab.netns_path('node1')}", "--",
                                 labmod.NFT, "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        assert f"table inet {lab.name}" in tables
        lab.blackhole("node1", on=False)
        assert lab.blackholes() == {}
        for family in (4, 6):
            assert _probe(lab, "node2", lab.ip("node1", family), labmod.AGENT_PORT) == "ok"
        tables = subprocess.run([labmod.NSENTER, f"--net={lab.netns_path('node1')}", "--",
                                 labmod.NFT, "list", "tables"], capture_output=True, text=True,
                                check=True).stdout
        assert tables.strip() == ""
    finally:
        srv.kill()
        srv.wait()
        if lab.blackholes():
            lab.blackhole("node1", on=False)


@pytest.mark.root
def test_two_instances_in_parallel(lab: labmod.Lab) -> None:
    other = labmod.Lab(OTHER_DIR, nodes=2, name=OTHER_NAME)
    srv: subprocess.Popen[str] | None = None
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        other.up(agents=False)
        assert set(labmod.live_instances()) >= {lab.name, other.name}
        for node in lab.nodes:  # same addresses, different namespaces
            assert lab.ip(node) == other.ip(node)
            assert os.stat(lab.netns_path(node)).st_ino != os.stat(other.netns_path(node)).st_ino
            assert other.run(node, ["hostname"]).stdout.strip() == node
        sleeper = other.popen("node1", ["sleep", "30"])
        _wait_exec(sleeper.pid, b"sleep")
        cg = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f":freezer:/{other.name}/node1\n" in cg and f"/{lab.name}/" not in cg
        assert sleeper.pid in other._lab_pids() and sleeper.pid not in lab._lab_pids()
        # a server in this lab's node2 is reached from its node1, not from the other's node1
        srv = lab.popen("node2", ["python3", "-c", LISTENER, "7999", lab.ip("node2")],
                        stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        assert _probe(lab, "node1", lab.ip("node2"), 7999) == "ok"
        assert _probe(other, "node1", other.ip("node2"), 7999) == "refused"
        # a black hole in one instance leaves the other alone
        other.blackhole("node2", 2201)
        assert _probe(other, "node1", other.ip("node2"), 2201) == "timeout"
        assert _probe(lab, "node1", lab.ip("node2"), 2201) == "ok"
        other.blackhole("node2", 2201, on=False)
        # each instance's sshd, PAM files and syslog file are its own
        other.set_pam("node2", ["action_generic_failure=allow"])
        r, _ = _ssh(other, "node1", "node2", ["hostname"])
        assert (r.returncode, r.stdout.strip()) == (0, "node2"), r.stderr
        r, _ = _ssh(lab, "node1", "node2", ["hostname"])
        assert r.returncode == 255 and "Access denied by pam_adopt" in r.stderr
        r, _ = _ssh(other, "node2", "node1", ["hostname"], user="bob", port=2202)
        assert r.returncode == 0, r.stderr
        _wait_for("the other lab's syslog", lambda: "node1 authpriv.info lab-sshd-node1-noop: "
                  "pam_unix(lab-sshd-node1-noop:session): session opened for user bob"
                  in other.syslog())
        other.run("node1", ["python3", "-c", SAY, "MARK-other-only"])
        _wait_for("the mark", lambda: "MARK-other-only" in other.syslog())
        assert "MARK-other-only" not in lab.syslog()
        # the /dev/log listener outlives whichever instance owns it
        dl = json.loads(labmod.SHARED_FILE.read_text()).get("devlog")
        for first, second in ((lab, other), (other, lab)):
            if first is other:
                lab.up(agents=False)  # back, sharing the other's listener
            first.down()
            assert _lab_traces(first) == []
            assert second.run("node1", ["hostname"]).stdout.strip() == "node1"
            if dl:
                now = json.loads(labmod.SHARED_FILE.read_text()).get("devlog")
                assert now and now["ino"] == dl["ino"]  # the same socket all along
                assert now["name"] != first.name
                pid = labmod._read_pid(Path(now["dir"]) / "pids" / "syslog.pid")
                assert pid is not None and labmod._pid_in_lab(pid, now["name"])
                marker = f"MARK-after-{first.name}-down"
                second.run("node2", ["python3", "-c", SAY, marker])
                _wait_for(marker, _logged(second, marker))
        assert _lab_traces(other) == []
        assert lab.is_up() and lab.run("node1", lab.ssh_argv("node2", ["true"], port=2201))
    finally:
        for p in (srv, sleeper):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        other.down(purge=True)
        if not lab.is_up():
            lab.up(agents=False)


@pytest.mark.root
def test_failed_up_leaves_nothing(lab: labmod.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = labmod.Lab(OTHER_DIR, nodes=1, name=OTHER_NAME)
    started: list[int] = []

    def fail(procs: dict[tuple[str, str], subprocess.Popen[bytes]]) -> None:
        started.extend(p.pid for p in procs.values())
        raise labmod.LabError("injected failure")

    monkeypatch.setattr(broken, "_wait_sshds", fail)
    with pytest.raises(labmod.LabError, match="injected failure"):
        broken.up(agents=False)
    assert len(started) == 3
    assert [pid for pid in started if labmod._pid_alive(pid)] == []
    assert _lab_traces(broken) == []
    broken.down(purge=True)
    assert lab.run("node1", lab.ssh_argv("node2", ["true"], port=2201)).returncode == 0


@pytest.mark.root
def test_down_leaves_nothing(lab: labmod.Lab) -> None:
    # Runs last in this file: takes the lab down and checks the machine is clean.
    assert _lab_traces(lab), "the lab should be visible while up"
    munged = int((lab.dir / "pids" / "munged.pid").read_text())
    sshds = [lab.sshd_pid(n, v) for n in lab.nodes for v in labmod.SSHD_VARIANTS]
    assert all(sshds) and len(sshds) == 6
    shared = json.loads(labmod.SHARED_FILE.read_text())
    dl = shared.get("devlog") or {}
    logger = labmod._read_pid(Path(dl["dir"]) / "pids" / "syslog.pid") if dl else None
    lab.blackhole("node2")
    logins = [lab.popen("node1", lab.ssh_argv("node2", ["sleep", "300"], port=2201),
                        user="alice")]
    sleepers = [lab.popen("node1", ["sleep", "300"], user="alice"),
                lab.popen("node2", ["sh", "-c", "trap '' TERM; sleep 300 & wait"],
                          start_new_session=True)]
    _wait_for("three sleep 300 (one in an ssh session on node2)",
              lambda: _count_cmdlines(lab, b"sleep\0" + b"300\0") >= 3, timeout=10)
    pids = lab._lab_pids()
    assert {munged, *sshds, *(p.pid for p in sleepers)} <= pids
    others = {n for n in labmod.live_instances() if n != lab.name}
    lab.down()
    for p in sleepers:
        assert p.wait(timeout=5) == -signal.SIGKILL
    for p in logins:
        p.wait(timeout=5)
    # The /dev/log listener may have sat in this lab's head cgroup and been handed over to
    # another instance that is up: it lives on there, and is no leftover of this lab.
    now = json.loads(labmod.SHARED_FILE.read_text()).get("devlog") \
        if labmod.SHARED_FILE.exists() else None
    if now and now["name"] != lab.name:
        pids.discard(labmod._read_pid(Path(now["dir"]) / "pids" / "syslog.pid") or 0)
    assert [pid for pid in pids if labmod._pid_alive(pid)] == []
    assert _lab_traces(lab) == []
    assert not (lab.dir / "ns").exists() and not (lab.dir / "lab.json").exists()
    assert not lab.netns_path("node2").exists()  # and the nft table with it
    assert "sshd-node1.log" in os.listdir(lab.dir / "logs")  # logs are kept
    if not others:  # nobody else shares the machine-wide things: they are gone too
        left = [str(f) for f in (labmod.SHARED_FILE, labmod.LOCK_FILE) if f.exists()]
        if dl:
            assert logger is not None and not labmod._pid_alive(logger)
            left += [str(labmod.DEV_LOG)] if labmod.DEV_LOG.exists() else []
        left += [d for d in shared.get("created_dirs", []) if Path(d).exists()]
        # (unless another suite's lab came up meanwhile and uses them)
        assert left == [] or labmod.instances(), left
    lab.down()  # idempotent
    assert _lab_traces(lab) == []
