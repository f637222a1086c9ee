"""ssh-to-job's client side: argument parsing, the pure command-line builder, the session
(temp dir lifetime, exit status, error reporting) and the proxy relay.

The relay runs against a real in-process gRPC server on 127.0.0.1:0 with a tiny fake
OpenJobShell (answers `opened`, echoes data, honours half-close) behind the real
AuthInterceptor and the fake MUNGE authenticator. ssh itself is never run here, except
`ssh -G` to check that OpenSSH accepts the options we build.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from node_agent.auth import AuthInterceptor, current_identity
from node_agent.cli import locate as locate_mod
from node_agent.cli import ssh_to_job as stj
from node_agent.cli.common import CliError
from node_agent.config import AgentConfig
from node_agent.errors import AuthError
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc
from tests.unit.fakes import FakeAuthenticator

FIND_JOB = stj.find_job  # the real one (the session fixture replaces it)

ALICE = 1001
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTests"
PROXY = ["/py", "-I", "-S", "/x/fdpass.py", "/t 100%/proxy.sock"]
ALIAS = "job-42.ssh-to-job"


# -- argument parsing ---------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expect"), [
    (["42"], dict(job_id="42", remote=(), ssh=("ssh",), shells=("/bin/zsh",))),
    (["42", "ls", "-l", "/tmp"], dict(job_id="42", remote=("ls", "-l", "/tmp"))),
    (["-name", "n1", "-debug", "42"], dict(name="n1", debug=True, job_id="42")),
    (["--name", "n1", "--debug", "42"], dict(name="n1", debug=True)),
    (["--name=n1", "42"], dict(name="n1")),
    (["-ssh", "scp -r", "42", "remote:dir", "."],
     dict(ssh=("scp", "-r"), remote=("remote:dir", "."))),
    (["--ssh", "sftp", "42"], dict(ssh=("sftp",), remote=())),
    (["-keygen-options", "-a 100", "42"], dict(keygen_options=("-a", "100"))),
    (["-shells", "/bin/zsh,/bin/sh", "42"], dict(shells=("/bin/zsh", "/bin/sh"))),
    (["--shells=", "42"], dict(shells=())),
    (["-auto-retry", "42"], dict(auto_retry=True)),
    (["--auto-retry", "42"], dict(auto_retry=True)),
    (["-X", "42"], dict(x11=True)),
    (["-x", "42"], dict(x11=False)),
    (["-config", "/c.toml", "42"], dict(config="/c.toml")),
    (["-remove-on-interrupt", "42"], dict(remove_on_interrupt=True)),
    (["--remove-on-interrupt", "42"], dict(remove_on_interrupt=True)),
    (["42"], dict(remove_on_interrupt=False)),
    # Options after the job id belong to the remote command.
    (["42", "-debug", "-X"], dict(debug=False, x11=None, remote=("-debug", "-X"))),
    (["--", "-7"], dict(job_id="-7")),
    # What rsync runs for `rsync -e ssh-to-job 42:path .` and `alice@42:path`.
    (["42", "rsync", "--server", "--sender", "-vlogDtpre.iLsfxCIvu", ".", "path"],
     dict(job_id="42", remote=("rsync", "--server", "--sender", "-vlogDtpre.iLsfxCIvu",
                               ".", "path"))),
    (["-l", "alice", "42", "rsync", "--server", ".", "p"],
     dict(login_user="alice", job_id="42", remote=("rsync", "--server", ".", "p"))),
    (["-lalice", "-p", "22", "-oCompression=yes", "-T", "42", "true"],
     dict(login_user="alice", passthrough=("-o", "Compression=yes", "-T"), job_id="42")),
    (["-Tq", "-o", "ServerAliveInterval=5", "42"],
     dict(passthrough=("-T", "-q", "-o", "ServerAliveInterval=5"))),
    # JOB@NODE (issue 12): the job id keeps its node; the location module splits it.
    (["42@node17", "true"], dict(login_user=None, job_id="42@node17", remote=("true",))),
    (["-help"], dict(help=True)),
    (["--help", "42"], dict(help=True)),
    (["-h"], dict(help=True)),
])
def test_parse(argv: list[str], expect: dict[str, Any]) -> None:
    args = stj.parse_args(argv, environ={"SHELL": "/bin/zsh"})
    for k, v in expect.items():
        assert getattr(args, k) == v, (k, args)


def test_parse_default_shells_without_shell_variable() -> None:
    assert stj.parse_args(["42"], environ={}).shells == ()


def test_parse_a_shell_variable_the_agent_would_refuse_is_left_out() -> None:
    for bad in ("bash", "/opt/my shell/bin/sh", "/bin/../bin/sh", "/" + "x" * 300):
        assert stj.parse_args(["42"], environ={"SHELL": bad}).shells == ()


@pytest.mark.parametrize("argv", [
    [], ["-debug"], ["-name"], ["--bogus", "42"], ["-Z", "42"], ["--debug=yes", "42"],
    ["-ssh", "", "42"], ["-ssh", "'unterminated", "42"], ["-l"], ["@"],
    ["42@"], ["@node1"], ["42@node1@x"], ["alice@42@node1"], ["42@node1:22"], ["42@a/b"],
    ["-shells", "bash", "42"], ["-shells", "/bin/sh,/x/../y", "42"],
])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    err = io.StringIO()
    assert stj.main(argv, out=io.StringIO(), err=err) == 2
    assert err.getvalue().startswith("ssh-to-job: Usage: "), err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_help_exit_0() -> None:
    out = io.StringIO()
    assert stj.main(["-help"], out=out, err=io.StringIO()) == 0
    assert "rsync -av -e ssh-to-job" in out.getvalue()
    assert "-ssh scp 42 remote:out.dat" in out.getvalue()


# -- the command line ---------------------------------------------------------------------

def build(ssh: tuple[str, ...] = ("ssh",), remote: tuple[str, ...] = (), **kw: Any) -> list[str]:
    return stj.build_command(ssh, key="/t/key", known_hosts="/t/known_hosts", job_id="42",
                             user="alice", proxy=PROXY, remote=remote, **kw)


def opts(cmd: list[str]) -> dict[str, str]:
    return {cmd[i + 1].split("=", 1)[0]: cmd[i + 1].split("=", 1)[1]
            for i, a in enumerate(cmd) if a == "-o"}


def test_ssh_command_keeps_host_checking_strict() -> None:
    cmd = build(remote=("hostname",))
    o = opts(cmd)
    assert o["StrictHostKeyChecking"] == "yes"
    assert o["UserKnownHostsFile"] == "/t/known_hosts"
    assert o["GlobalKnownHostsFile"] == "/dev/null"
    assert o["HostKeyAlias"] == ALIAS
    assert o["IdentitiesOnly"] == "yes"
    assert o["BatchMode"] == "yes"
    assert o["User"] == "alice"
    # Quoted for /bin/sh, '%' escaped for ssh's token expansion.
    assert o["ProxyCommand"] == "/py -I -S /x/fdpass.py '/t 100%%/proxy.sock'"
    assert o["ProxyUseFdpass"] == "yes"
    assert cmd[0] == "ssh" and cmd[1:3] == ["-F", "/dev/null"]
    assert cmd[cmd.index("-i") + 1] == "/t/key"
    assert cmd[-3:] == [ALIAS, "--", "hostname"]
    assert "-v" not in cmd and "-X" not in cmd and "-x" not in cmd


def test_ssh_interactive_has_no_command() -> None:
    assert build()[-1] == ALIAS


def test_debug_x11_and_passthrough() -> None:
    cmd = build(remote=("true",), debug=True, x11=True, extra=("-o", "Compression=yes"))
    assert "-v" in cmd and "-X" in cmd
    # Ours first: ssh keeps the first value of an option.
    assert cmd.index("ProxyCommand=" + opts(cmd)["ProxyCommand"]) < cmd.index("Compression=yes")
    assert cmd.index("Compression=yes") < cmd.index(ALIAS)
    assert "-x" in build(x11=False)


def test_user_program_args_come_after_ours() -> None:
    cmd = build(ssh=("ssh", "-o", "StrictHostKeyChecking=no"))
    first = cmd.index("StrictHostKeyChecking=yes")
    assert first < cmd.index("StrictHostKeyChecking=no")


def test_known_hosts_path_with_blank_is_quoted() -> None:
    cmd = stj.build_command(("ssh",), key="/t x/key", known_hosts="/t x/known_hosts",
                            job_id="42", user="alice", proxy=PROXY)
    assert opts(cmd)["UserKnownHostsFile"] == '"/t x/known_hosts"'
    assert cmd[cmd.index("-i") + 1] == "/t x/key"


def test_scp_rewrites_any_placeholder_host() -> None:
    cmd = build(ssh=("scp", "-r"), remote=("remote:out dir", "./local:x", "/abs:y", "."))
    assert cmd[0] == "scp" and "-r" in cmd
    assert cmd[-4:] == [f"{ALIAS}:out dir", "./local:x", "/abs:y", "."]
    up = build(ssh=("scp",), remote=("in.dat", "whatever@node7:"), debug=True, x11=True)
    assert up[-2:] == ["in.dat", f"{ALIAS}:"]
    assert "-v" in up and "-X" not in up  # scp -X means something else
    assert opts(up)["StrictHostKeyChecking"] == "yes"


def test_scp_without_remote_argument_is_an_error() -> None:
    with pytest.raises(ValueError, match="HOST:PATH"):
        build(ssh=("scp",), remote=("a", "b"))


def test_sftp() -> None:
    cmd = build(ssh=("sftp",))
    assert cmd[0] == "sftp" and cmd[-1] == ALIAS and "--" not in cmd
    assert build(ssh=("sftp",), remote=("-b", "batch"))[-3:] == ["-b", "batch", ALIAS]
    assert build(ssh=("/usr/bin/sftp",), remote=("x:dir",))[-1] == f"{ALIAS}:dir"


def test_rsync_invocation_end_to_end_of_parsing() -> None:
    args = stj.parse_args(["-l", "alice", "42", "rsync", "--server", "-vlogDtpre.iLsf", ".",
                           "dir/"], environ={})
    cmd = stj.build_command(args.ssh, key="/t/key", known_hosts="/t/kh", job_id=args.job_id,
                            user="alice", proxy=PROXY, remote=args.remote,
                            extra=args.passthrough)
    assert cmd[-7:] == [ALIAS, "--", "rsync", "--server", "-vlogDtpre.iLsf", ".", "dir/"]


def test_alias_is_a_plain_host_name() -> None:
    assert stj.alias_of("12.3") == "job-12.3.ssh-to-job"
    assert stj.alias_of("a:b@c/d e") == "job-a_b_c_d_e.ssh-to-job"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_openssh_accepts_the_options() -> None:
    cmd = build(remote=("true",), x11=False)
    r = subprocess.run([cmd[0], "-G", *cmd[1:]], capture_output=True, text=True, check=True)
    conf = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert conf["stricthostkeychecking"] == "true"
    assert conf["hostkeyalias"] == ALIAS
    assert conf["user"] == "alice"
    assert conf["userknownhostsfile"] == "/t/known_hosts"
    assert conf["batchmode"] == "yes"
    assert conf["identitiesonly"] == "yes"
    assert conf["proxycommand"].startswith("/py -I -S /x/fdpass.py")
    assert conf["proxyusefdpass"] == "yes"


def test_proxy_argv_is_fdpass_without_site() -> None:
    argv = stj.proxy_argv("/t/proxy.sock", python="/usr/bin/python3")
    assert argv == ["/usr/bin/python3", "-I", "-S", stj.FDPASS, "/t/proxy.sock"]
    assert os.path.exists(stj.FDPASS)


# -- a fake agent -------------------------------------------------------------------------

@dataclass
class FakeAgent(agent_pb2_grpc.NodeAgentServicer):
    jobs: dict[str, pb.Job] = field(default_factory=dict)
    list_calls: int = 0
    start_after: int | None = None  # ListJobs calls after which job "42" appears
    opens: list[tuple[int, pb.ShellOpen]] = field(default_factory=list)
    refuse: tuple[grpc.StatusCode, str] | None = None
    open_delay: float = 0.0
    banner: bytes = b"SSH-2.0-Fake\r\n"
    grant_removal: bool = True   # False: an agent that ignores remove_on_interrupt

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext,
                 ) -> pb.ListJobsReply:
        self.list_calls += 1
        if self.start_after is not None and self.list_calls > self.start_after:
            self.jobs["42"] = pb.Job(id="42", user="alice", uid=ALICE, state="running",
                                     node="n1")
        jobs = [j for j in self.jobs.values() if not request.job_id or j.id == request.job_id]
        return pb.ListJobsReply(jobs=jobs, node="n1")

    def OpenJobShell(self, request_iterator: Iterator[pb.ShellFrame],
                     context: grpc.ServicerContext) -> Iterator[pb.ShellFrame]:
        # Not a generator itself: AuthInterceptor's identity is only set while the
        # handler function runs, so it is read here, before the generator starts.
        uid = current_identity().uid
        return self._shell(uid, request_iterator, context)

    def _shell(self, uid: int, request_iterator: Iterator[pb.ShellFrame],
               context: grpc.ServicerContext) -> Iterator[pb.ShellFrame]:
        first = next(request_iterator)
        self.opens.append((uid, first.open))
        if self.refuse:
            context.abort(*self.refuse)
        time.sleep(self.open_delay)
        yield pb.ShellFrame(opened=pb.ShellOpened(
            host_key=HOST_KEY, node="n1", user="alice", session_id="s1",
            remove_on_interrupt=first.open.remove_on_interrupt and self.grant_removal))
        if self.banner:
            yield pb.ShellFrame(data=self.banner)
        for frame in request_iterator:  # echo, then half-close after the client's eof
            if frame.data:
                yield pb.ShellFrame(data=frame.data)
            if frame.eof:
                yield pb.ShellFrame(eof=True)
                return


@pytest.fixture
def fake_agent() -> Iterator[tuple[FakeAgent, str, FakeAuthenticator]]:
    auth = FakeAuthenticator()
    servicer = FakeAgent()  # type: ignore[abstract]  # the rest answers UNIMPLEMENTED
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         interceptors=[AuthInterceptor(auth, {"ip:127.0.0.1"})])
    agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"ipv4:127.0.0.1:{port}", auth
    finally:
        server.stop(0)


# -- locating the job ---------------------------------------------------------------------

def locate(targets: list[str], job_id: str, auth: FakeAuthenticator, *, auto_retry: bool,
           err: io.StringIO, sleep: Callable[[float], None] = time.sleep,
           timeout: float = 10.0) -> locate_mod.Located:
    """The location module's search over explicit agents, as ssh-to-job runs it."""
    return locate_mod.Locator(AgentConfig(), auth, err, prog=stj.PROG, sleep=sleep
                              ).locate_targets(targets, job_id, auto_retry=auto_retry,
                                               timeout=timeout)


def test_locate_found_and_not_found(fake_agent: tuple[FakeAgent, str, FakeAuthenticator],
                                    ) -> None:
    servicer, target, auth = fake_agent
    servicer.jobs["42"] = pb.Job(id="42", user="alice", state="running", node="n1")
    where = locate([target], "42", auth.as_uid(ALICE), auto_retry=False, err=io.StringIO())
    assert (where.target, where.job.user, where.node) == (target, "alice", "n1")
    with pytest.raises(CliError, match="no job 7") as e:
        locate([target], "7", auth.as_uid(ALICE), auto_retry=False, err=io.StringIO())
    assert e.value.category == "Not found"


def test_locate_skips_dead_agents_and_waits_with_auto_retry(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator]) -> None:
    servicer, target, auth = fake_agent
    servicer.start_after = 3
    err = io.StringIO()
    sleeps: list[float] = []
    where = locate(["unix:/nonexistent/agent.sock", target], "42", auth.as_uid(ALICE),
                       auto_retry=True, err=err, sleep=sleeps.append, timeout=2)
    assert where.job.state == "running" and len(sleeps) == 3
    text = err.getvalue()
    assert text.count("waiting for job 42 to start") == 1
    assert text.endswith("...\n")


def test_locate_does_not_wait_for_an_ending_job(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator]) -> None:
    servicer, target, auth = fake_agent
    servicer.jobs["42"] = pb.Job(id="42", user="alice", state="ending", node="n1")
    sleeps: list[float] = []
    with pytest.raises(CliError, match="job 42 is ending on n1") as e:
        locate([target], "42", auth.as_uid(ALICE), auto_retry=True, err=io.StringIO(),
                   sleep=sleeps.append)
    assert e.value.category == "Not running" and sleeps == []


def test_main_unknown_job_is_one_clear_line(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, target, auth = fake_agent
    port = int(target.rsplit(":", 1)[1])
    monkeypatch.setattr("node_agent.cli.ssh_to_job.config_mod.find",
                        lambda explicit=None: AgentConfig(port=port))
    err = io.StringIO()
    rc = stj.main(["-name", "127.0.0.1", "99"], out=io.StringIO(), err=err,
                  authenticator=auth.as_uid(ALICE))
    assert rc == 1
    assert err.getvalue() == "ssh-to-job: Not found: no job 99 on 127.0.0.1 (or not yours)\n"


# -- the session --------------------------------------------------------------------------

@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """main() up to ssh: a located job, the real ssh-keygen, a fake ssh."""
    state: dict[str, Any] = {"rc": 0, "raise": None, "error_line": None}
    monkeypatch.setattr("node_agent.cli.ssh_to_job.config_mod.find",
                        lambda explicit=None: AgentConfig())
    monkeypatch.setattr(stj, "find_job", lambda *a, **k: stj.Located(
        "unix:/run/a.sock", pb.Job(id="42", user="alice", state="running"), "n1"))
    real_run = subprocess.run

    def fake_run(cmd: list[str], *a: Any, **k: Any) -> Any:
        if cmd[0] == "ssh-keygen":
            return real_run(cmd, *a, **k)
        tmp = os.path.dirname(cmd[cmd.index("-i") + 1])
        state["cmd"], state["tmp"] = cmd, tmp
        state["mode"] = os.stat(tmp).st_mode & 0o777
        state["files"] = sorted(os.listdir(tmp))
        if state["error_line"]:
            state["relay"].error = state["error_line"]
        if state["raise"]:
            raise state["raise"]
        return subprocess.CompletedProcess(cmd, state["rc"])

    class FakeRelay:
        def __init__(self, **kw: Any) -> None:
            self.sock_path = os.path.join(kw["tmp"], "proxy.sock")
            self.error = ""
            self.removal = stj.Removal() if kw.get("remove_on_interrupt") else None
            state["relay"] = self
            state["relay_kw"] = kw

        def remove_job(self) -> str:
            state["removed"] = True
            return str(state.get("remove_line", ""))

        def start(self) -> None:
            state["started"] = True

        def close(self, grace: float = 0.0) -> None:
            state["closed"] = True
            state.setdefault("graces", []).append(grace)

    monkeypatch.setattr("node_agent.cli.ssh_to_job.subprocess.run", fake_run)
    monkeypatch.setattr(stj, "Relay", FakeRelay)
    return state


needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")


@needs_keygen
def test_session_exit_status_and_temp_dir_removed(session: dict[str, Any]) -> None:
    session["rc"] = 7
    assert stj.main(["42", "exit 7"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 7
    assert session["mode"] == 0o700
    assert session["files"] == ["key", "key.pub"]
    assert session["cmd"][-3:] == [ALIAS, "--", "exit 7"]
    assert opts(session["cmd"])["User"] == "alice"
    assert f"{session['tmp']}/proxy.sock" in opts(session["cmd"])["ProxyCommand"]
    assert session["started"] and session["closed"]
    assert session["graces"][0] > 0  # after ssh, the agent may end the session first
    assert not os.path.exists(session["tmp"])


@needs_keygen
def test_temp_dir_removed_on_ctrl_c(session: dict[str, Any]) -> None:
    session["raise"] = KeyboardInterrupt()
    assert stj.main(["42"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 130
    assert session["tmp"] and not os.path.exists(session["tmp"])
    assert session["graces"] == [0.0]  # Ctrl-C: the session is cancelled at once


@needs_keygen
@pytest.mark.parametrize(("interrupt", "rc"), [(KeyboardInterrupt(), 130),
                                               (stj._Signalled(15), 143),
                                               (stj._Signalled(1), 129)])
def test_remove_on_interrupt_asks_the_relay_and_says_how_it_went(
        session: dict[str, Any], interrupt: BaseException, rc: int) -> None:
    session["raise"] = interrupt
    session["remove_line"] = "Removed: job 42 ended (3 processes killed)"
    err = io.StringIO()
    assert stj.main(["-remove-on-interrupt", "42", "sleep 100"], err=err,
                    authenticator=FakeAuthenticator()) == rc
    assert session["relay_kw"]["remove_on_interrupt"] is True
    assert session["removed"]
    assert err.getvalue() == "ssh-to-job: Removed: job 42 ended (3 processes killed)\n"
    assert not os.path.exists(session["tmp"])


@needs_keygen
def test_without_remove_on_interrupt_ctrl_c_removes_nothing(session: dict[str, Any]) -> None:
    session["raise"] = KeyboardInterrupt()
    err = io.StringIO()
    assert stj.main(["42", "sleep 100"], err=err, authenticator=FakeAuthenticator()) == 130
    assert session["relay_kw"]["remove_on_interrupt"] is False
    assert "removed" not in session and err.getvalue() == ""


@needs_keygen
def test_remove_on_interrupt_after_a_normal_end_removes_nothing(
        session: dict[str, Any]) -> None:
    assert stj.main(["-remove-on-interrupt", "42", "true"], err=io.StringIO(),
                    authenticator=FakeAuthenticator()) == 0
    assert "removed" not in session


@needs_keygen
def test_temp_dir_removed_on_sigterm(session: dict[str, Any]) -> None:
    session["raise"] = stj._Signalled(15)
    assert stj.main(["42"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 143
    assert not os.path.exists(session["tmp"])


@needs_keygen
def test_proxy_error_becomes_one_line(session: dict[str, Any]) -> None:
    session["rc"] = 255
    session["error_line"] = "Permission denied: job 42 belongs to alice"
    err = io.StringIO()
    assert stj.main(["42"], err=err, authenticator=FakeAuthenticator()) == 1
    assert err.getvalue() == "ssh-to-job: Permission denied: job 42 belongs to alice\n"
    assert not os.path.exists(session["tmp"])


@needs_keygen
def test_ssh_255_without_proxy_error_is_passed_on(session: dict[str, Any]) -> None:
    session["rc"] = 255
    assert stj.main(["42"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 255


@needs_keygen
def test_scp_without_remote_path_exit_2(session: dict[str, Any]) -> None:
    err = io.StringIO()
    assert stj.main(["-ssh", "scp", "42", "a", "b"], err=err,
                    authenticator=FakeAuthenticator()) == 2
    assert "HOST:PATH" in err.getvalue()


@needs_keygen
def test_key_dir_exists_while_locating_and_is_gone_when_the_job_is_not_found(
        session: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[list[str]] = []

    def not_found(*a: Any, **k: Any) -> None:
        (tmp,) = os.listdir(tmp_path)  # the key's directory exists while locating
        seen.append(sorted(os.listdir(tmp_path / tmp)))
        raise CliError("Not found", "no job 42 on any agent")

    monkeypatch.setattr(stj, "find_job", not_found)
    err = io.StringIO()
    assert stj.main(["42"], err=err, authenticator=FakeAuthenticator()) == 1
    assert err.getvalue() == "ssh-to-job: Not found: no job 42 on any agent\n"
    assert len(seen) == 1
    assert os.listdir(tmp_path) == []  # nothing left: no directory, no key


@needs_keygen
def test_cluster_proc_on_slurm_is_the_cluster(session: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node_agent.cli.ssh_to_job.config_mod.find",
                        lambda explicit=None: AgentConfig(backend="slurm"))
    monkeypatch.setattr(stj, "find_job", FIND_JOB)  # the real search, below squeue
    asked: list[str] = []

    def slurm_node(job_id: str, auto_retry: bool, query: Any = None) -> str:
        asked.append(job_id)
        return "127.0.0.1"   # (an address: no name is looked up)

    monkeypatch.setattr(locate_mod, "slurm_batch_host", slurm_node)
    located: list[tuple[str | None, str]] = []

    def direct(self: Any, node: str | None, job_id: str) -> Any:
        located.append((node, job_id))
        return locate_mod._Round(running=stj.Located(
            "unix:/run/a.sock", pb.Job(id=job_id, user="alice", state="running"), "n1"))

    monkeypatch.setattr(locate_mod.Locator, "_direct", direct)
    assert stj.main(["42.0", "true"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 0
    assert asked == ["42"] and located == [("127.0.0.1", "42")]
    assert session["cmd"][-3:] == [ALIAS, "--", "true"]
    # CLUSTER.PROC@NODE: the node is asked, Slurm is not
    assert stj.main(["42.0@127.0.0.2", "true"], err=io.StringIO(),
                    authenticator=FakeAuthenticator()) == 0
    assert asked == ["42"] and located[-1] == ("127.0.0.2", "42")


def test_cluster_proc_other_than_0_on_slurm_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("node_agent.cli.ssh_to_job.config_mod.find",
                        lambda explicit=None: AgentConfig(backend="slurm"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(locate_mod, "slurm_batch_host", lambda *a: pytest.fail("Slurm was asked"))
    err = io.StringIO()
    assert stj.main(["42.1", "true"], err=err, authenticator=FakeAuthenticator()) == 2
    assert err.getvalue() == (
        "ssh-to-job: Usage: invalid job id '42.1': Slurm job ids are plain numbers: "
        "CLUSTER.PROC means job CLUSTER only when PROC is 0 (42.0 is job 42; 42.1 is no "
        "job)\n")
    assert os.listdir(tmp_path) == []   # before anything was made


@needs_keygen
def test_cluster_proc_is_left_alone_on_the_native_registry(
        session: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stj, "find_job", FIND_JOB)
    located: list[str] = []

    def locate(self: Any, job_id: str, **k: Any) -> stj.Located:
        located.append(job_id)
        return stj.Located("unix:/run/a.sock", pb.Job(id=job_id, user="alice",
                                                      state="running"), "n1")

    monkeypatch.setattr(locate_mod.Locator, "locate", locate)
    assert stj.main(["42.1", "true"], err=io.StringIO(), authenticator=FakeAuthenticator()) == 0
    assert located == ["42.1"]   # a native job may be named so


def test_keygen_failure_is_clear(session: dict[str, Any]) -> None:
    err = io.StringIO()
    assert stj.main(["-keygen-options", "-t nonsense", "42"], err=err,
                    authenticator=FakeAuthenticator()) == 1
    assert err.getvalue().startswith("ssh-to-job: Key generation: ")


# -- the relay ----------------------------------------------------------------------------

class PipeEnd:
    """ssh's end of the relay, over two pipes: what ssh writes (in_w) and reads (out_r)."""

    def __init__(self) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.connected = threading.Event()

    def read(self, n: int) -> list[bytes]:
        data = os.read(self.in_r, n)
        return [data] if data else []

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.out_w, view):]

    def close_write(self) -> None:
        os.close(self.out_w)
        self.out_w = -1


@dataclass
class RelayRun:
    end: PipeEnd
    err: io.StringIO
    thread: threading.Thread
    result: list[str]

    def finish(self, timeout: float = 10.0) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        for fd in (self.end.in_r, self.end.in_w, self.end.out_r, self.end.out_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return self.result[0]


def start_relay(target: str, auth: FakeAuthenticator, tmp: Path,
                open_timeout: float = 5.0) -> RelayRun:
    (tmp / "key.pub").write_text("ssh-ed25519 AAAAclientkey ssh-to-job\n")
    end = PipeEnd()
    err = io.StringIO()
    result: list[str] = []

    def connect() -> PipeEnd:
        end.connected.set()
        return end

    def run() -> None:
        result.append(stj.relay(
            target=target, job_id="42", pubkey=str(tmp / "key.pub"),
            known_hosts=str(tmp / "known_hosts"), alias=ALIAS, shells=["bash", "sh"],
            auth=auth, connect=connect, err=err, open_timeout=open_timeout))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return RelayRun(end, err, t, result)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_relay_cannot_write_known_hosts_is_one_line_and_ends_the_session(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path) -> None:
    servicer, target, auth = fake_agent
    (tmp_path / "known_hosts").mkdir()  # not writable as a file
    r = start_relay(target, auth.as_uid(ALICE), tmp_path)
    error = r.finish()
    assert error.startswith("Known hosts: cannot write ") and "Is a directory" in error
    assert not r.end.connected.is_set()  # nothing reached ssh
    assert len(servicer.opens) == 1


def test_relay_round_trip_with_half_close(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path) -> None:
    servicer, target, auth = fake_agent
    r = start_relay(target, auth.as_uid(ALICE), tmp_path)
    # The first byte ssh sees: known_hosts must already hold the session's key.
    first = os.read(r.end.out_r, 1)
    assert first == b"S"
    assert (tmp_path / "known_hosts").read_text() == f"{ALIAS} {HOST_KEY}\n"
    assert (tmp_path / "known_hosts").stat().st_mode & 0o777 == 0o600
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB frames

    def write() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(r.end.in_w, view[:65536]):]
        os.close(r.end.in_w)  # half-close: ssh's side is done, the echo keeps coming
        r.end.in_w = -1

    w = threading.Thread(target=write)
    w.start()
    got = read_all(r.end.out_r)  # ends when the agent's eof half-closes our side
    w.join(5)
    assert r.finish() == ""
    assert got == servicer.banner[1:] + payload
    uid, opened = servicer.opens[0]
    assert uid == ALICE
    assert (opened.job_id, opened.public_key, list(opened.shells)) == (
        "42", "ssh-ed25519 AAAAclientkey ssh-to-job", ["bash", "sh"])


@pytest.mark.parametrize(("refuse", "line"), [
    ((grpc.StatusCode.PERMISSION_DENIED, "job 42 is not yours"),
     "Permission denied: job 42 is not yours"),
    ((grpc.StatusCode.NOT_FOUND, "no job 42"), "Not found: no job 42"),
])
def test_relay_refused(fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path,
                       refuse: tuple[grpc.StatusCode, str], line: str) -> None:
    servicer, target, auth = fake_agent
    servicer.refuse = refuse
    r = start_relay(target, auth.as_uid(1002), tmp_path)
    assert r.finish() == line
    assert not r.end.connected.is_set()  # ssh's connection was never taken
    assert not (tmp_path / "known_hosts").exists()


def test_relay_unimplemented_agent(tmp_path: Path) -> None:
    auth = FakeAuthenticator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[AuthInterceptor(auth, {"ip:127.0.0.1"})])
    agent_pb2_grpc.add_NodeAgentServicer_to_server(
        agent_pb2_grpc.NodeAgentServicer(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        r = start_relay(f"ipv4:127.0.0.1:{port}", auth, tmp_path)
        line = r.finish()
    finally:
        server.stop(0)
    assert line.startswith("Not supported: ")


def test_relay_refuses_a_session_whose_removal_the_agent_did_not_grant(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path) -> None:
    """An agent that does not know -remove-on-interrupt opens a plain session: refused
    before ssh gets a byte, so that Ctrl-C never silently leaves the job running."""
    servicer, target, auth = fake_agent
    servicer.grant_removal = False
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAAclientkey ssh-to-job\n")
    connected: list[bool] = []
    removal = stj.Removal()
    error = stj.relay(target=target, job_id="42", pubkey=str(tmp_path / "key.pub"),
                      known_hosts=str(tmp_path / "known_hosts"), alias=ALIAS, shells=[],
                      auth=auth.as_uid(ALICE), connect=lambda: connected.append(True),
                      err=io.StringIO(), removal=removal)
    assert error == (f"Not supported: the agent at {target} cannot end job 42 on an "
                     "interrupt (-remove-on-interrupt)")
    assert connected == [] and not removal.granted.is_set()
    assert servicer.opens[0][1].remove_on_interrupt


def test_relay_remove_job_before_the_session_opened_says_so(tmp_path: Path) -> None:
    relay = stj.Relay(target="unix:/nonexistent", job_id="42", tmp=str(tmp_path), shells=[],
                      auth=FakeAuthenticator(), err=io.StringIO(), remove_on_interrupt=True)
    try:
        assert relay.remove_job(timeout=1) == ("Not removed: job 42: the session was not "
                                               "open yet")
    finally:
        relay.close()


def test_relay_open_deadline(fake_agent: tuple[FakeAgent, str, FakeAuthenticator],
                             tmp_path: Path) -> None:
    servicer, target, auth = fake_agent
    servicer.open_delay = 2.0
    r = start_relay(target, auth, tmp_path, open_timeout=0.3)
    assert r.finish().startswith("Timeout: no session from ")


def test_relay_unreachable_agent(tmp_path: Path) -> None:
    r = start_relay("unix:/nonexistent/agent.sock", FakeAuthenticator(), tmp_path)
    assert r.finish().startswith("Agent unreachable: ")


class BrokenMunge(FakeAuthenticator):
    def encode(self, payload: bytes, *, restrict_uid: int | None = None,
               ttl: int | None = None) -> str:
        raise AuthError("munged is not reachable at /run/munge/munge.socket.2")


def test_relay_munge_failure(fake_agent: tuple[FakeAgent, str, FakeAuthenticator],
                             tmp_path: Path) -> None:
    _servicer, target, _auth = fake_agent
    r = start_relay(target, BrokenMunge(), tmp_path)
    assert r.finish() == "MUNGE: munged is not reachable at /run/munge/munge.socket.2"
    assert r.err.getvalue() == ""  # the CLI prints it, once


@needs_keygen
def test_relay_class_hands_ssh_a_socket_through_fdpass(
        fake_agent: tuple[FakeAgent, str, FakeAuthenticator], tmp_path: Path) -> None:
    """The real Relay and fdpass.py: what ssh would get is a connected socket that carries
    the session's bytes both ways."""
    servicer, target, auth = fake_agent
    tmp = tmp_path / "t"
    tmp.mkdir(mode=0o700)
    stj.finish_keygen(stj.start_keygen(str(tmp), []))
    relay = stj.Relay(target=target, job_id="42", tmp=str(tmp), shells=[],
                      auth=auth.as_uid(ALICE), err=io.StringIO())
    relay.start()
    ssh_side, helper_side = socket.socketpair()
    try:
        helper = subprocess.run(stj.proxy_argv(relay.sock_path), stdout=helper_side.fileno(),
                                timeout=30)
        assert helper.returncode == 0
        _, fds, _, _ = socket.recv_fds(ssh_side, 1, 1)
        conn = socket.socket(fileno=fds[0])
        assert conn.recv(1) == b"S"  # the banner's first byte, after known_hosts is written
        assert (tmp / "known_hosts").read_text() == f"{ALIAS} {HOST_KEY}\n"
        conn.sendall(b"ping")
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        assert data == servicer.banner[1:] + b"ping"
        conn.close()
    finally:
        relay.close()
        ssh_side.close()
        helper_side.close()
    assert relay.error == ""


def test_version_of_the_three_clis(capsys: pytest.CaptureFixture[str]) -> None:
    import node_agent
    from node_agent.cli.adoptctl import main as adoptctl_main
    from node_agent.cli.daemon import main as agent_main

    out = io.StringIO()
    assert stj.main(["-version"], out=out, err=io.StringIO()) == 0
    assert out.getvalue() == f"ssh-to-job {node_agent.__version__}\n"
    assert adoptctl_main(["--version"]) == 0
    assert capsys.readouterr().out == f"adoptctl {node_agent.__version__}\n"
    with pytest.raises(SystemExit) as e:
        agent_main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"node-agent {node_agent.__version__}\n"
