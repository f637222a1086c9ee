"""`ssh job.42`: ssh-to-job's -ssh-config block, host names, the key directory, the
locked known_hosts and the proxy handshake against the fake agent of test_ssh_to_job.py
(a real in-process gRPC server behind the real AuthInterceptor). ssh runs only as
`ssh -G`, to check that OpenSSH reads the block as meant.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from node_agent.cli import ssh_proxy as sp
from node_agent.cli import ssh_to_job as stj
from node_agent.cli.common import CliError, UsageError, run
from node_agent.config import AgentConfig
from node_agent.proto.v1 import agent_pb2 as pb
from tests.unit.fakes import FakeAuthenticator
from tests.unit.test_ssh_to_job import ALICE, HOST_KEY, FakeAgent
from tests.unit.test_ssh_to_job import fake_agent as fake_agent  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


# -- names and arguments ------------------------------------------------------------------

@pytest.mark.parametrize(("host", "job"), [
    ("job.42", "42"), ("JOB.42", "42"), ("job.42.0", "42.0"), ("job.stj-late", "stj-late"),
    ("job.42--node17", "42@node17"), ("job.42.0--gpu-01", "42.0@gpu-01"),
    ("job.42_3", "42_3"), ("job.42+1", "42+1"),
])
def test_job_of_host(host: str, job: str) -> None:
    assert sp.job_of_host(host) == job


@pytest.mark.parametrize("host", ["node1", "job.", "job.42--", "job.--node1", "jobs.42",
                                  "job.4/2", "job.a@b", "job.4 2", "job.4:2", "job.4*2",
                                  "job.4,2", "job.[4]", "job.!4", "job.4\x00"])
def test_job_of_host_refuses_other_names(host: str) -> None:
    with pytest.raises(UsageError, match="not a job host name"):
        sp.job_of_host(host)


def test_known_hosts_name_is_what_ssh_looks_up() -> None:
    assert sp.known_hosts_name("Job.42", 22) == "job.42"
    assert sp.known_hosts_name("job.42", 2222) == "[job.42]:2222"


@pytest.mark.parametrize(("argv", "wanted"), [
    (["-proxy", "job.1"], True), (["--proxy=job.1"], True), (["-ssh-config"], True),
    (["-config", "/x.toml", "--ssh-config"], True), (["-name", "proxy", "42"], False),
    (["42", "-proxy"], False), (["-ssh", "ssh -proxy", "42"], False), (["--", "-proxy"], False),
    (["42"], False),
])
def test_modes_are_recognised_among_options_only(argv: list[str], wanted: bool) -> None:
    assert sp.wanted(argv) is wanted


def test_parse_proxy_args() -> None:
    a = sp.parse_proxy_args(["-proxy", "job.7", "-port", "22", "-ssh-dir", "/d", "-debug"])
    assert (a.host, a.port, a.ssh_dir, a.debug, a.ssh_config) == ("job.7", 22, "/d", True,
                                                                    False)
    assert sp.parse_proxy_args(["--ssh-config", "--config=/c"]).config == "/c"
    assert sp.parse_proxy_args(["-ssh-config", "-via", "me@login1"]).via == "me@login1"
    for bad in (["-proxy", "job.7", "-ssh-config"], ["-port", "2"], ["-proxy"],
                ["-proxy", "job.7", "-port", "x"], ["-proxy", "job.7", "-port", "0"],
                ["-proxy", "job.7", "extra"], ["-ssh-config", "-debug"],
                ["-proxy", "job.7", "-name", "n"], ["-proxy", "job.7", "-via", "login1"],
                ["-ssh-config", "-via", "login1 -oProxyCommand=x"],
                ["-ssh-config", "-via", "-oProxyCommand=x"],
                ["-ssh-config", "-via", "login1;id"]):
        with pytest.raises(UsageError):
            sp.parse_proxy_args(bad)


def test_bad_host_is_a_usage_line(tmp_path: Path) -> None:
    err = io.StringIO()
    assert stj.main(["-proxy", "node1", "-ssh-dir", str(tmp_path / "d")], out=io.StringIO(),
                    err=err) == 2
    assert err.getvalue() == ("ssh-to-job: Usage: 'node1' is not a job host name (job.ID or "
                              "job.ID--NODE)\n")


# -- the Host block -------------------------------------------------------------------------

def test_block_text() -> None:
    text = sp.ssh_config_block(["/opt/bin/ssh-to-job"])
    lines = [line.strip() for line in text.splitlines()]
    assert "Host job.*" in lines
    # %n: the host name as typed (ssh lower-cases %h; job ids are case-sensitive)
    assert "ProxyCommand /opt/bin/ssh-to-job -proxy %n -port %p" in lines
    for line in ["IdentityFile ~/.ssh/ssh-to-job/id_ed25519", "IdentitiesOnly yes",
                 "UserKnownHostsFile ~/.ssh/ssh-to-job/known_hosts",
                 "GlobalKnownHostsFile /dev/null", "StrictHostKeyChecking yes",
                 "UpdateHostKeys no", "CheckHostIP no"]:
        assert line in lines
    assert not any(line.startswith(("User ", "StrictHostKeyChecking no")) for line in lines)


def ssh_g(config: Path, host: str) -> dict[str, str]:
    r = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True,
                       check=True)
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def test_ssh_reads_the_block_as_meant(tmp_path: Path) -> None:
    """What OpenSSH makes of it: our own '%' and blanks kept, the ProxyCommand run with
    the host and port (a stand-in records its argv; ssh then fails, no network used)."""
    d = tmp_path / "a dir 100%"
    bindir = tmp_path / "b in 5%"
    bindir.mkdir()
    prog = bindir / "ssh-to-job"
    prog.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{tmp_path}/argv'\n")
    prog.chmod(0o755)
    config = tmp_path / "config"
    config.write_text(sp.ssh_config_block([str(prog)], str(d), "/etc/c 1%.toml"))
    got = ssh_g(config, "job.42--node7")
    assert got["userknownhostsfile"] == f"{d}/known_hosts"
    assert got["stricthostkeychecking"] == "true"
    assert got["globalknownhostsfile"] == "/dev/null"
    assert "proxycommand" not in ssh_g(config, "node7")  # other hosts are left alone
    r = subprocess.run(["ssh", "-F", str(config), "-p", "2222", "job.42--node7", "true"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 255, r.stderr
    assert (tmp_path / "argv").exists(), r.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-ssh-dir", str(d), "-config", "/etc/c 1%.toml", "-proxy", "job.42--node7",
        "-port", "2222"]


def test_ssh_config_mode_prints_the_block_and_makes_the_key(tmp_path: Path) -> None:
    out, d = io.StringIO(), tmp_path / "keys"
    rc = sp.main(["-ssh-config", "-ssh-dir", str(d)], out=out, err=io.StringIO(),
                 program=["/p/ssh-to-job"])
    assert rc == 0
    assert out.getvalue() == sp.ssh_config_block(["/p/ssh-to-job"], str(d))
    assert (d.stat().st_mode & 0o777, (d / "id_ed25519").stat().st_mode & 0o777) == (0o700,
                                                                                      0o600)
    assert (d / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")


def test_via_block_as_ssh_reads_it(tmp_path: Path) -> None:
    """-via: the proxy runs on the login node through ssh, the host key comes from its
    known_hosts (an absolute ssh: KnownHostsCommand is not run by a shell), the key is
    this machine's; our own '%' kept, %n and %p substituted."""
    config = tmp_path / "config"
    config.write_text(sp.ssh_config_block(["/opt/b 5%/ssh-to-job"], via="me@login1",
                                          remote_dir="/home/me/.ssh/ssh-to-job"))
    got = ssh_g(config, "job.Run7")
    assert got["knownhostscommand"] == (
        "/usr/bin/ssh me@login1 'cat /home/me/.ssh/ssh-to-job/known_hosts'")
    assert got["identityfile"] == "~/.ssh/ssh-to-job/id_ed25519"
    assert (got["userknownhostsfile"], got["globalknownhostsfile"]) == ("/dev/null",
                                                                        "/dev/null")
    assert got["stricthostkeychecking"] == "true"
    # The ProxyCommand as the shell runs it: a stand-in `ssh` first on PATH records its
    # argv (the login node's command line), then the real ssh fails on its silence.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{tmp_path}/argv'\n")
    (bindir / "ssh").chmod(0o755)
    real_ssh = shutil.which("ssh") or "ssh"
    r = subprocess.run([real_ssh, "-F", str(config), "job.Run7", "true"], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.returncode == 255, r.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "me@login1", "'/opt/b 5%/ssh-to-job' -proxy job.Run7 -port 22"]


def test_ssh_config_via_makes_no_key_and_a_pub_alone_is_used(tmp_path: Path) -> None:
    """The login node's directory gets the other machine's .pub only: -ssh-config -via
    makes no key pair, and the proxy sends that .pub (it never needs the private key)."""
    d = tmp_path / "keys"
    out = io.StringIO()
    assert sp.main(["-ssh-config", "-via", "login1", "-ssh-dir", str(d)], out=out,
                   err=io.StringIO(), program=["/p/ssh-to-job"]) == 0
    assert out.getvalue() == sp.ssh_config_block(["/p/ssh-to-job"], str(d), via="login1",
                                                 remote_dir=str(d))
    assert sorted(p.name for p in d.iterdir()) == []
    (d / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI laptop\n")
    assert sp.ensure_key(str(d)) == "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI laptop"
    assert not (d / "id_ed25519").exists()


# -- the key directory ----------------------------------------------------------------------

def test_key_dir_is_refused_when_others_can_reach_it(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    with pytest.raises(CliError, match="must be a directory of yours with mode 0700"):
        sp.ensure_dir(str(d))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real").mkdir(mode=0o700)
    with pytest.raises(CliError, match="must be a directory of yours"):
        sp.ensure_dir(str(tmp_path / "link"))


def test_key_dir_in_a_fresh_home(tmp_path: Path) -> None:
    d = tmp_path / ".ssh" / "ssh-to-job"
    assert sp.ensure_dir(str(d)) == str(d)
    assert (tmp_path / ".ssh").stat().st_mode & 0o777 == 0o700


def _in_processes(n: int, code: str) -> list[str]:
    """Run `code` in n interpreters at once; their outputs."""
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def test_first_use_by_several_proxies_at_once_makes_one_key(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    outs = _in_processes(4, "from node_agent.cli import ssh_proxy as sp; "
                            f"print(sp.ensure_key({str(d)!r}))")
    assert len(set(outs)) == 1 and outs[0].startswith("ssh-ed25519 ")
    assert (d / "id_ed25519.pub").read_text().strip() == outs[0].strip()
    assert sorted(p.name for p in d.iterdir()) == ["id_ed25519", "id_ed25519.pub", "lock"]


# -- known_hosts ------------------------------------------------------------------------------

def fake_proc(root: Path, pid: int, start: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    fields = ["S"] + ["0"] * 18 + [start, "0"]   # field 22 (starttime) is the 20th here
    (root / str(pid) / "stat").write_text(f"{pid} (ssh-to-job) " + " ".join(fields) + "\n")


def test_known_hosts_entries_live_with_their_proxies(tmp_path: Path) -> None:
    procfs, d = tmp_path / "proc", tmp_path / "k"
    d.mkdir(mode=0o700)
    fake_proc(procfs, 100, "555")
    fake_proc(procfs, 300, "999")   # pid 300 now is another process than the entry's
    (d / "known_hosts").write_text(
        "# the user's own\n"
        "job.42 ssh-ed25519 AAAAlive ssh-to-job:n1:100:555\n"
        "job.42 ssh-ed25519 AAAAdead ssh-to-job:n1:200:777\n"
        "job.43 ssh-ed25519 AAAAreused ssh-to-job:n1:300:333\n"
        "job.42 ssh-ed25519 AAAAother ssh-to-job:n2:200:777\n")
    mark = sp.marker("n1", 100, str(procfs))
    assert mark == "ssh-to-job:n1:100:555"
    sp.add_host_key(str(d), "job.42", HOST_KEY + " comment", "ssh-to-job:n1:101:1", "n1",
                    str(procfs))
    lines = (d / "known_hosts").read_text().splitlines()
    assert lines == ["# the user's own",
                     "job.42 ssh-ed25519 AAAAlive ssh-to-job:n1:100:555",   # runs: kept
                     "job.42 ssh-ed25519 AAAAother ssh-to-job:n2:200:777",  # not ours to judge
                     f"job.42 {HOST_KEY} ssh-to-job:n1:101:1"]
    assert (d / "known_hosts").stat().st_mode & 0o777 == 0o600
    sp.remove_host_key(str(d), "ssh-to-job:n1:101:1")
    assert (d / "known_hosts").read_text().splitlines() == lines[:3]


def test_concurrent_updates_lose_no_entry(tmp_path: Path) -> None:
    """Eight proxies add their entry at once: all eight are there (a read-modify-write
    without the lock loses some)."""
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    code = ("import os; from node_agent.cli import ssh_proxy as sp\n"
            "for i in range(20):\n"
            f"    sp.add_host_key({str(d)!r}, f'job.{{os.getpid()}}', {HOST_KEY!r}, "
            "f'ssh-to-job:y:{os.getpid()}:{i}', 'x')\n"
            f"    sp.remove_host_key({str(d)!r}, f'ssh-to-job:y:{{os.getpid()}}:{{i}}')\n"
            f"sp.add_host_key({str(d)!r}, f'job.{{os.getpid()}}', {HOST_KEY!r}, "
            "f'ssh-to-job:y:{os.getpid()}:last', 'x')\n")
    _in_processes(8, code)
    lines = (d / "known_hosts").read_text().splitlines()
    assert len(lines) == 8 and all(line.endswith(":last") for line in lines)
    assert sorted(p.name for p in d.iterdir()) == ["known_hosts", "lock"]


# -- the proxy against the fake agent ---------------------------------------------------------

class Ssh:
    """The ssh side of a ProxyCommand: two pipes, as OpenSSH makes them."""

    def __init__(self) -> None:
        self.to_proxy_r, self.to_proxy_w = os.pipe()
        self.from_proxy_r, self.from_proxy_w = os.pipe()

    def close(self) -> None:
        for fd in (self.to_proxy_r, self.to_proxy_w, self.from_proxy_r, self.from_proxy_w):
            try:
                os.close(fd)
            except OSError:
                pass


def start_proxy(port: int, auth: Any, d: Path, ssh: Ssh, host: str = "job.42--127.0.0.1",
                ) -> tuple[threading.Thread, dict[str, Any]]:
    args = sp.ProxyArgs(host=host, port=22, ssh_dir=str(d))
    result: dict[str, Any] = {}

    def go() -> None:
        err = io.StringIO()
        result["rc"] = run("ssh-to-job", lambda: sp.run_proxy(
            args, AgentConfig(port=port), auth, err, rfd=ssh.to_proxy_r,
            wfd=ssh.from_proxy_w), err)
        result["err"] = err.getvalue()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, result


def test_proxy_writes_the_host_key_before_the_first_byte_and_relays_with_half_close(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path) -> None:
    servicer, target, auth = fake_agent
    servicer.jobs["42"] = pb.Job(id="42", user="alice", uid=ALICE, state="running", node="n1")
    d, ssh = tmp_path / "keys", Ssh()
    t, result = start_proxy(int(target.rsplit(":", 1)[1]), auth.as_uid(ALICE), d, ssh)
    try:
        first = os.read(ssh.from_proxy_r, 1)   # what ssh reads first ...
        known = (d / "known_hosts").read_text()  # ... comes after its host key is there
        assert first == b"S"
        assert known.startswith(f"job.42--127.0.0.1 {HOST_KEY} ssh-to-job:"), known
        rest = b""
        while not rest.endswith(b"\r\n"):
            rest += os.read(ssh.from_proxy_r, 100)
        assert first + rest == servicer.banner
        os.write(ssh.to_proxy_w, b"hello")
        assert os.read(ssh.from_proxy_r, 100) == b"hello"
        os.close(ssh.to_proxy_w)  # ssh's EOF -> the session's eof -> ssh's EOF
        assert os.read(ssh.from_proxy_r, 100) == b""
        t.join(10)
        assert not t.is_alive() and result == {"rc": 0, "err": ""}
    finally:
        ssh.close()
    uid, opened = servicer.opens[0]
    assert (uid, opened.job_id) == (ALICE, "42")
    assert opened.public_key == (d / "id_ed25519.pub").read_text().strip()
    assert (d / "known_hosts").read_text() == ""  # the entry went with its proxy


@pytest.mark.parametrize("refuse", [(grpc.StatusCode.NOT_FOUND, "no job 42 on n1 (or not yours)"),
                                    (grpc.StatusCode.PERMISSION_DENIED, "not yours")])
def test_refused_session_is_one_line_and_ssh_gets_nothing(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path,
        refuse: tuple[grpc.StatusCode, str]) -> None:
    servicer, target, auth = fake_agent
    servicer.jobs["42"] = pb.Job(id="42", user="alice", uid=ALICE, state="running", node="n1")
    servicer.refuse = refuse
    d, ssh = tmp_path / "keys", Ssh()
    t, result = start_proxy(int(target.rsplit(":", 1)[1]), auth.as_uid(ALICE), d, ssh)
    try:
        t.join(10)
        os.close(ssh.from_proxy_w)
        assert os.read(ssh.from_proxy_r, 100) == b""  # not a byte reached ssh
    finally:
        ssh.close()
    assert result["rc"] == 1
    assert result["err"].count("\n") == 1 and result["err"].startswith("ssh-to-job: ")
    assert refuse[1] in result["err"]
    assert not (d / "known_hosts").exists() or (d / "known_hosts").read_text() == ""


def test_unknown_job_is_one_line_before_any_session(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, target, auth = fake_agent
    port = int(target.rsplit(":", 1)[1])
    monkeypatch.setattr("node_agent.cli.ssh_to_job.config_mod.find",
                        lambda explicit=None: AgentConfig(port=port))
    err = io.StringIO()
    rc = stj.main(["-proxy", "job.99--127.0.0.1", "-ssh-dir", str(tmp_path / "k")],
                  out=io.StringIO(), err=err, authenticator=auth.as_uid(ALICE))
    assert rc == 1
    assert err.getvalue() == "ssh-to-job: Not found: no job 99 on 127.0.0.1 (or not yours)\n"
    assert servicer.opens == []
