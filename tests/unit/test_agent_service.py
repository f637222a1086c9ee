"""The agent's gRPC service in-process: authentication, authorization, the registry,
errors, health and reflection, and adoptctl against it.

A real grpc server on 127.0.0.1:0 and a unix socket; a fake authenticator instead of
munged; a fake resolver (the resolution chain has its own tests); a real JobRegistry
on a fake cgroup tree under tmp_path.
"""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from callerid import CgroupLayout, Connection, Hierarchy, Resolution, Step
from node_agent import shellwire
from node_agent.agent import metrics
from node_agent.agent.limits import SessionLimits
from node_agent.agent.server import create_server
from node_agent.agent.service import NodeAgentServicer
from node_agent.auth import Claim, digest, reply_payload
from node_agent.cli import ssh_to_job as stj
from node_agent.cli.adoptctl import main as adoptctl_main
from node_agent.client import AgentClient
from node_agent.errors import AuthError, JobNotFound
from node_agent.jobs.native import JobRegistry
from node_agent.pbconv import connection_to_pb
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc
from tests.unit.fakes import FakeAuthenticator

ALICE = 1001
BOB = 1002


@dataclass
class FakeResolver:
    """Answers from a table: (local, remote) text -> (job id, socket uid, pid)."""

    table: dict[tuple[str, str], tuple[str | None, int, int]] = field(default_factory=dict)
    asked: list[Connection] = field(default_factory=list)

    def resolve(self, conn: Connection, want_pid: bool = False) -> Resolution:
        self.asked.append(conn)
        hit = self.table.get((str(conn.local), str(conn.remote)))
        if hit is None:
            return Resolution(conn, None, None, None, None, "not-found",
                              (Step("sock_diag", "no such connection", 1.0),))
        job, uid, pid = hit
        return Resolution(conn, job, pid if want_pid else None, uid, 4242,
                          "netlink+cgroup-id", (Step("sock_diag", f"inode 4242 uid {uid}", 1.0),
                                                Step("cgroup-id", f"job {job}", 1.0)))

    def close(self) -> None:
        pass


@dataclass
class Agent:
    auth: FakeAuthenticator
    resolver: FakeResolver
    registry: JobRegistry
    tcp: str
    unix: str
    cgroot: Path
    servicer: NodeAgentServicer

    def client(self, uid: int = 0, unix: bool = False) -> AgentClient:
        return AgentClient(self.unix if unix else self.tcp, self.auth.as_uid(uid), timeout=5,
                           local_node="testnode")


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    yield from start_agent(tmp_path, monkeypatch)


def start_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, shells: Any = None,
                limits: SessionLimits | None = None, max_workers: int = 16,
                ) -> Iterator[Agent]:
    """The agent in-process (see the module docstring), stopped when the caller is done."""
    # The registry looks users up; make alice and bob exist without touching /etc/passwd.
    import pwd as pwd_mod

    real_getpwnam = pwd_mod.getpwnam
    users = {"alice": ALICE, "bob": BOB}

    def getpwnam(name: str) -> pwd_mod.struct_passwd:
        if name in users:
            uid = users[name]
            return pwd_mod.struct_passwd((name, "x", uid, uid, "", f"/home/{name}", "/bin/sh"))
        return real_getpwnam(name)

    monkeypatch.setattr("node_agent.jobs.native.pwd.getpwnam", getpwnam)
    cgroot = tmp_path / "cgroup"
    hier = (Hierarchy("freezer", 1, cgroot / "freezer"),
            Hierarchy("unified", 2, cgroot / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    layout = CgroupLayout(hier, "callerid")
    registry = JobRegistry(tmp_path / "state", layout, node="testnode",
                           procfs=str(tmp_path / "proc"))
    registry.recover()
    resolver = FakeResolver()
    servicer = NodeAgentServicer(node="testnode", resolver=resolver,  # type: ignore[arg-type]
                                 jobs=registry, admin_uids=(1500,), shells=shells,
                                 limits=limits)
    auth = FakeAuthenticator()
    sock = tmp_path / "agent.sock"
    server, ports = create_server(servicer, auth, [f"unix:{sock}", "127.0.0.1:0"],
                                  max_workers=max_workers)
    server.start()
    try:
        yield Agent(auth, resolver, registry, f"127.0.0.1:{ports[1]}", f"unix:{sock}", cgroot,
                    servicer)
    finally:
        server.stop(0)
        registry.close()


CONN = AgentClient.connection("10.0.0.1", 40000, "10.0.0.2", 22)


def test_caller_id_root_sees_any_job(agent: Agent) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    with agent.client(0) as c:
        reply = c.caller_id(CONN)
    assert reply.outcome == pb.CallerIdReply.FOUND
    assert (reply.job_id, reply.user, reply.uid, reply.node) == ("42", "alice", ALICE, "testnode")
    # The swap: SSH_CONNECTION's src is this node's local end.
    asked = agent.resolver.asked[-1]
    assert (str(asked.local), str(asked.remote)) == ("10.0.0.1:40000", "10.0.0.2:22")
    assert not reply.steps  # only Whois explains


def test_caller_id_owner_and_admin_see_it_others_get_unknown(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    with agent.client(ALICE) as c:
        assert c.caller_id(CONN).job_id == "42"
    with agent.client(1500) as c:  # configured admin uid
        assert c.caller_id(CONN).job_id == "42"
    caplog.set_level(logging.WARNING, logger="node_agent.security")
    with agent.client(BOB) as c:
        reply = c.whois(CONN)
    assert reply.outcome == pb.CallerIdReply.UNKNOWN
    assert reply.job_id == "" and reply.pid == 0 and not reply.steps and reply.user == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "node_agent.security"]
    assert any("uid 1002" in m and "job 42" in m and "SECURITY" in m for m in lines), lines


def test_socket_of_another_user_without_job_is_unknown_too(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = (None, ALICE, 777)
    caplog.set_level(logging.WARNING, logger="node_agent.security")
    with agent.client(BOB) as c:
        reply = c.whois(CONN)
    assert reply.outcome == pb.CallerIdReply.UNKNOWN and reply.pid == 0
    assert any("uid 1002" in r.getMessage() for r in caplog.records)


def test_someone_elses_connection_is_answered_like_a_missing_one(agent: Agent) -> None:
    """Whois (with steps) and CallerId: bob cannot tell alice's connection, in a job or
    not, from one that does not exist; alice still gets her own explained."""
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.resolver.table[("10.0.0.1:40001", "10.0.0.2:22")] = (None, ALICE, 778)
    agent.registry.start("42", "alice")
    missing = AgentClient.connection("10.0.0.1", 40002, "10.0.0.2", 22)
    in_job = CONN
    no_job = AgentClient.connection("10.0.0.1", 40001, "10.0.0.2", 22)
    with agent.client(BOB) as c:
        for ask in (c.whois, c.caller_id):
            answers = {ask(conn).SerializeToString(deterministic=True)
                       for conn in (missing, in_job, no_job)}
            assert len(answers) == 1, answers
    with agent.client(ALICE) as c:
        assert c.whois(no_job).steps  # her own connection, not in a job: explained
        assert c.whois(no_job).pid == 778


def test_whois_explains_and_finds_pid(agent: Agent) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    with agent.client(ALICE, unix=True) as c:
        reply = c.whois(CONN)
    assert reply.pid == 777
    assert [s.name for s in reply.steps] == ["sock_diag", "cgroup-id"]


def test_resolved_job_unknown_to_registry_is_unknown(agent: Agent) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("99", ALICE, 777)
    with agent.client(0) as c:
        assert c.caller_id(CONN).outcome == pb.CallerIdReply.UNKNOWN


@pytest.mark.parametrize("conn, needle", [
    (pb.Connection(src_ip="10.0.0.999", src_port=1, dst_ip="10.0.0.2", dst_port=22), "invalid"),
    (pb.Connection(src_ip="10.0.0.1", src_port=0, dst_ip="10.0.0.2", dst_port=22), "ports"),
    (pb.Connection(src_ip="10.0.0.1", src_port=70000, dst_ip="10.0.0.2", dst_port=22), "invalid"),
    (pb.Connection(), "invalid"),
])
def test_malformed_connection_is_invalid_argument(agent: Agent, conn: pb.Connection,
                                                   needle: str) -> None:
    # Past the client's own types (it sends only valid callerid.Connections).
    with agent.client(0) as c, pytest.raises(grpc.RpcError) as e:
        c.stub.CallerId(pb.CallerIdRequest(connection=conn), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (e.value.details() or "")


def test_ipv4_mapped_is_normalised(agent: Agent) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    conn = AgentClient.connection("::ffff:10.0.0.1", 40000, "::ffff:10.0.0.2", 22)
    with agent.client(0) as c:
        assert c.caller_id(conn).job_id == "42"


def _claim(method: str, request: object, target: str = "ip:127.0.0.1") -> bytes:
    return Claim(method, target, digest(request)).payload()


def test_calls_without_valid_credentials_are_refused(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent.security")
    channel = grpc.insecure_channel(agent.tcp)
    stub = agent_pb2_grpc.NodeAgentStub(channel)
    req = pb.CallerIdRequest(connection=connection_to_pb(CONN))
    method = "/callerid_adopt.v1.NodeAgent/CallerId"

    def refused(cred: str) -> str:
        with pytest.raises(grpc.RpcError) as e:
            stub.CallerId(req, timeout=5, metadata=(("x-munge-cred", cred),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return e.value.details() or ""

    with pytest.raises(grpc.RpcError) as e:
        stub.CallerId(req, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no MUNGE credential" in (e.value.details() or "")
    cred = agent.auth.encode(_claim(method, req), restrict_uid=0)
    stub.CallerId(req, timeout=5, metadata=(("x-munge-cred", cred),))
    assert "Replayed" in refused(cred)   # the same credential again
    assert "not minted for this method" in refused(
        agent.auth.encode(_claim("/callerid_adopt.v1.NodeAgent/ListJobs", req)))
    # Meant for another node: by address, or by name over a node's own socket.
    assert "minted for ip:10.77.0.12, not for this node" in refused(
        agent.auth.encode(_claim(method, req, "ip:10.77.0.12")))
    assert "minted for node:node2, not for this node" in refused(
        agent.auth.encode(_claim(method, req, "node:node2")))
    # Minted for another question (another connection) than the one asked.
    other = pb.CallerIdRequest(
        connection=connection_to_pb(AgentClient.connection("10.0.0.9", 1, "10.0.0.2", 22)))
    assert "not minted for this request" in refused(agent.auth.encode(_claim(method, other)))
    assert "not minted by callerid-adopt" in refused(agent.auth.encode(method.encode()))
    assert "Invalid credential format" in refused("garbage")
    lines = [r.getMessage() for r in caplog.records if "SECURITY:" in r.getMessage()]
    assert len(lines) == 7, lines
    assert all("refused the credential" in line for line in lines)
    channel.close()


def test_answers_carry_the_agents_credential(agent: Agent) -> None:
    """The reply credential: made by root, for this caller only, bound to this request."""
    channel = grpc.insecure_channel(agent.tcp)
    stub = agent_pb2_grpc.NodeAgentStub(channel)
    req = pb.ListJobsRequest()
    method = "/callerid_adopt.v1.NodeAgent/ListJobs"
    alice = agent.auth.as_uid(ALICE)
    cred = alice.encode(_claim(method, req), restrict_uid=0)
    _, call = stub.ListJobs.with_call(req, timeout=5, metadata=(("x-munge-cred", cred),))
    reply = dict(call.trailing_metadata())["x-munge-reply"]
    assert isinstance(reply, str)
    with pytest.raises(AuthError, match="Unauthorized"):
        agent.auth.as_uid(BOB).decode(reply)  # for alice only
    ident, payload = alice.decode(reply)
    assert ident.uid == 0
    assert payload == reply_payload(method, cred)
    channel.close()


def test_health_and_reflection_need_no_credential(agent: Agent) -> None:
    with grpc.insecure_channel(agent.tcp) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = health.Check(health_pb2.HealthCheckRequest(service="callerid_adopt.v1.NodeAgent"),
                            timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "callerid_adopt.v1.NodeAgent" in names


def test_registry_rpcs_need_root_or_admin(agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent.security")
    with agent.client(ALICE) as c:
        for call in (lambda: c.start_job("7", "alice"), lambda: c.end_job("7"),
                     lambda: c.attach("7", 1234)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not list((agent.cgroot / "freezer").rglob("job_7"))
    assert any("uid 1001 tried to start jobs" in r.getMessage() for r in caplog.records)
    with agent.client(1500) as c:
        assert c.start_job("7", "alice").id == "7"


@pytest.mark.parametrize("job_id", ["../x", "a/b", "x" * 4096, "a\x00b", "", ".", "..", " x"])
def test_hostile_job_ids_never_become_paths(agent: Agent, job_id: str) -> None:
    with agent.client(0) as c, pytest.raises(grpc.RpcError) as e:
        c.start_job(job_id, "alice")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job id" in (e.value.details() or "").lower()
    created = sorted(str(p.relative_to(agent.cgroot)) for p in agent.cgroot.rglob("*"))
    assert all(p in ("freezer", "unified") for p in created), created
    assert agent.registry.list_jobs() == []


def test_job_lifecycle_and_listing(agent: Agent) -> None:
    with agent.client(0) as c:
        c.start_job("42", "alice")
        c.start_job("43", "bob")
        with pytest.raises(grpc.RpcError) as e:
            c.start_job("42", "alice")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            c.start_job("44", "no-such-user-here")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown user" in (e.value.details() or "")
        assert [j.id for j in c.list_jobs().jobs] == ["42", "43"]
        for h in ("freezer", "unified"):
            assert (agent.cgroot / h / "callerid" / "job_42" / "main").is_dir()
    with agent.client(ALICE) as c:  # a user sees only their own jobs
        assert [j.id for j in c.list_jobs().jobs] == ["42"]
    with agent.client(0) as c:
        reply = c.end_job("42")
        assert reply.job.id == "42"
        assert not (agent.cgroot / "freezer" / "callerid" / "job_42").exists()
        with pytest.raises(grpc.RpcError) as e:
            c.end_job("42")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert [j.id for j in c.list_jobs().jobs] == ["43"]


def test_registry_survives_restart(agent: Agent, tmp_path: Path) -> None:
    agent.registry.start("42", "alice")
    # A job with a (fake) process in its cgroup is kept across a restart.
    procs = agent.cgroot / "unified" / "callerid" / "job_42" / "main" / "cgroup.procs"
    procs.write_text("1\n")
    again = JobRegistry(tmp_path / "state", agent.registry.layout, node="testnode",
                        procfs="/proc")
    again.recover()
    assert [r.job.id for r in again.list_jobs()] == ["42"]
    again.close()


def test_metrics_count_requests_and_answers(agent: Agent) -> None:
    before = metrics.ANSWERS.labels("unknown")._value.get()
    with agent.client(0) as c:
        c.caller_id(CONN)
    assert metrics.ANSWERS.labels("unknown")._value.get() == before + 1
    assert metrics.REQUESTS.labels("CallerId", "OK")._value.get() >= 1


# -- adoptctl against the in-process agent -------------------------------------------------

def adoptctl(agent: Agent, uid: int, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = adoptctl_main(["--agent", agent.tcp.replace("127.0.0.1", "127.0.0.1"), *argv],
                       out=out, err=err, authenticator=agent.auth.as_uid(uid))
    return rc, out.getvalue(), err.getvalue()


def test_adoptctl_jobs_and_errors(agent: Agent) -> None:
    rc, out, err = adoptctl(agent, 0, "job", "start", "--id", "42", "--user", "alice")
    assert rc == 0 and "job 42 of alice started on testnode (42@testnode)" in out, err
    rc, out, _ = adoptctl(agent, 0, "jobs")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["JOBID", "USER", "STATE"]
    # JOB@NODE: what ssh-to-job takes without searching (issue 12)
    assert out.splitlines()[1].split()[:3] == ["42@testnode", "alice", "running"]
    rc, out, err = adoptctl(agent, 0, "job", "end", "../../etc")
    assert rc == 1 and err.startswith("adoptctl: Invalid argument: ") and "job id" in err.lower()
    rc, out, err = adoptctl(agent, ALICE, "job", "end", "42")
    assert rc == 1 and err.startswith("adoptctl: Permission denied: ")
    rc, out, err = adoptctl(agent, 0, "job", "show", "nope")
    assert rc == 1 and "Not found" in err
    rc, out, err = adoptctl(agent, 0, "job", "run", "--id", "9", "--user", "alice")
    assert rc == 2 and "needs a command" in err


def test_adoptctl_whois_prints_the_chain(agent: Agent) -> None:
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    rc, out, err = adoptctl(agent, ALICE, "whois", "10.0.0.1:40000", "10.0.0.2:22",
                            "--node", agent.tcp)
    assert rc == 0, err
    assert "job         42" in out and "pid         777" in out and "cgroup-id" in out
    rc, out, err = adoptctl(agent, BOB, "whois", "10.0.0.1:40000", "10.0.0.2:22",
                            "--node", agent.tcp)
    assert rc == 1 and "unknown" in out
    rc, out, err = adoptctl(agent, 0, "whois", "10.0.0.1", "10.0.0.2:22")
    assert rc == 2 and "Usage" in err


def test_adoptctl_unreachable_agent(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = adoptctl_main(["--agent", f"unix:{tmp_path}/nothing.sock", "--timeout", "1", "jobs"],
                       out=out, err=err, authenticator=FakeAuthenticator())
    assert rc == 1
    assert err.getvalue().startswith("adoptctl: ") and (
        "unreachable" in err.getvalue() or "Timeout" in err.getvalue())


# -- ssh-to-job: the caps, the `open` deadline, and control calls never behind sessions ----
# OpenJobShell against a fake JobShellSessions: a session is a FakeSession whose output
# stays open until it is killed (the relay, the caps and the threads are the real ones).

WAIT = 60.0  # generous: only reached when something is wrong


class FakeSession:
    def __init__(self, sid: str, user: str) -> None:
        self.session_id, self.user, self.host_key = sid, user, "ssh-ed25519 AAAAfake"
        self.ended = threading.Event()
        self.kill_started = threading.Event()
        self.kill_may_finish = threading.Event()
        self.kill_may_finish.set()
        self.cleaned = threading.Event()

    def write(self, data: bytes | memoryview) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def __iter__(self) -> Iterator[list[bytes]]:
        self.ended.wait()
        return iter(())

    def kill(self) -> None:
        self.kill_started.set()
        self.kill_may_finish.wait()  # a cgroup kill can take seconds
        self.ended.set()

    def cleanup(self) -> None:
        self.kill()
        self.cleaned.set()


@dataclass
class FakeShells:
    opened: list[FakeSession] = field(default_factory=list)
    slow_kill: bool = False

    def open(self, job_id: str, caller_uid: int, admin: bool, public_key: str,
             shells: list[str]) -> FakeSession:
        if job_id != "42":
            raise JobNotFound(job_id, "testnode")
        session = FakeSession(f"s{len(self.opened)}", "alice")
        if self.slow_kill:
            session.kill_may_finish.clear()
        self.opened.append(session)
        return session


@dataclass
class Stream:
    """One OpenJobShell call; it sends `open` (or nothing) when `send` is set."""

    call: Any
    send: threading.Event
    stop: threading.Event
    client: Any   # an AgentClient, or a plain grpc.Channel: close() ends either

    def first(self) -> Any:
        """The agent's first frame (or its RpcError); the call is cancelled, and the test
        fails, if none comes within WAIT (e.g. a handler that never got a thread)."""
        timer = threading.Timer(WAIT, self.call.cancel)
        timer.start()
        try:
            return next(self.call)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.CANCELLED, "no answer from the agent"
            raise
        finally:
            timer.cancel()


def open_stream(agent: Agent, uid: int, open_frame: pb.ShellFrame | None = None) -> Stream:
    """A stream of `uid`'s that sends `open_frame` (then waits for `stop`), or, without
    one, sends nothing at all: what a user's hand-made client can do (ssh-to-job and
    AgentClient always send `open` first, since their credential is bound to it)."""
    send, stop = threading.Event(), threading.Event()

    def frames() -> Iterator[pb.ShellFrame]:
        send.wait()
        if open_frame is not None:
            yield open_frame
        stop.wait()

    if open_frame is not None:
        send.set()
        client: Any = agent.client(uid)
        return Stream(client.open_job_shell(frames()), send, stop, client)
    # A valid credential (for a first frame it will never send), on a plain channel.
    channel = grpc.insecure_channel(agent.tcp)
    cred = agent.auth.as_uid(uid).encode(
        Claim(shellwire.METHOD, "ip:127.0.0.1", digest(OPEN_42)).payload(), restrict_uid=0)
    call = channel.stream_stream(shellwire.METHOD, request_serializer=shellwire.serialize,
                                 response_deserializer=shellwire.parse)
    return Stream(call(frames(), metadata=(("x-munge-cred", cred),)), send, stop, channel)


OPEN_42 = pb.ShellFrame(open=pb.ShellOpen(job_id="42", public_key="ssh-ed25519 AAAA k"))


def refusal(stream: Stream) -> grpc.RpcError:
    try:
        with pytest.raises(grpc.RpcError) as e:
            stream.first()
    finally:
        stream.stop.set()
        stream.client.close()
    return e.value


@pytest.fixture
def shells() -> FakeShells:
    return FakeShells()


@pytest.fixture
def capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells,
           ) -> Iterator[Agent]:
    """At most 4 sessions, 2 per user, idle streams kept for a minute, and ONE thread for
    every other method: any call that had to wait for a session's thread would hang."""
    yield from start_agent(tmp_path, monkeypatch, shells=shells, max_workers=1,
                           limits=SessionLimits(4, 2, open_timeout=WAIT))


def end_all(streams: list[Stream], shells: FakeShells) -> None:
    for s in streams:
        s.stop.set()
        s.call.cancel()
        s.client.close()
    for session in shells.opened:
        session.kill_may_finish.set()


def test_idle_streams_past_the_caps_are_refused_and_logged(
        capped: Agent, shells: FakeShells, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent.agent.service")
    limiter = capped.servicer.sessions
    held = [open_stream(capped, ALICE), open_stream(capped, ALICE)]
    try:
        # Streams that have sent nothing count from their start.
        assert limiter.wait_held(2, WAIT, uid=ALICE)
        e = refusal(open_stream(capped, ALICE))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == ("uid 1001 already has 2 ssh-to-job sessions on testnode "
                               "(max_sessions_per_user)")
        held.append(open_stream(capped, BOB, OPEN_42))  # a real session counts the same
        held.append(open_stream(capped, 0))
        assert limiter.wait_held(4, WAIT)
        for uid in (BOB, 0, 1500):  # root and admins pass the per-user cap, not the total
            e = refusal(open_stream(capped, uid))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.details() == "testnode already has 4 ssh-to-job sessions (max_sessions)"
        lines = [r.getMessage() for r in caplog.records]
        assert ("ssh-to-job: refused: uid 1001 already has 2 ssh-to-job sessions on testnode "
                "(max_sessions_per_user)") in lines
        assert sum("(max_sessions)" in m for m in lines) == 3, lines
        # Ending a stream gives its place back.
        held[0].stop.set()
        held[0].call.cancel()
        assert limiter.wait_held(1, WAIT, uid=ALICE)
        held.append(open_stream(capped, ALICE))
        assert limiter.wait_held(2, WAIT, uid=ALICE)
    finally:
        end_all(held, shells)
    assert limiter.wait_held(0, WAIT)


def test_idle_stream_is_ended_after_the_open_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent.agent.service")
    for agent in start_agent(tmp_path, monkeypatch, shells=shells,
                             limits=SessionLimits(4, 2, open_timeout=0.2)):
        idle = open_stream(agent, ALICE)
        try:
            with pytest.raises(grpc.RpcError) as raised:  # no deadline of its own
                idle.first()
            e = raised.value
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert e.details() == "no `open` frame within 0.2 s"
            # Its place is free again, though the client has not even half-closed.
            assert agent.servicer.sessions.wait_held(0, WAIT)
        finally:
            end_all([idle], shells)
        assert ("ssh-to-job: uid 1001 sent no `open` frame within 0.2 s: stream ended"
                in [r.getMessage() for r in caplog.records])
        # The helper thread that waited for the frame ends with the call.
        deadline = time.monotonic() + WAIT
        while any(t.name == "shell-open" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the `open` reader outlived its call"
            time.sleep(0.01)
        # A stream that sends `open` in time gets its session.
        ok = open_stream(agent, ALICE, OPEN_42)
        try:
            assert ok.first().opened.session_id == "s0"
        finally:
            end_all([ok], shells)


def test_control_calls_answer_while_every_session_is_held(
        capped: Agent, shells: FakeShells) -> None:
    agent = capped
    agent.resolver.table[("10.0.0.1:40000", "10.0.0.2:22")] = ("42", ALICE, 777)
    agent.registry.start("42", "alice")
    # Two running sessions of alice's and two idle streams of bob's: every slot.
    held = [open_stream(agent, ALICE, OPEN_42), open_stream(agent, ALICE, OPEN_42),
            open_stream(agent, BOB), open_stream(agent, BOB)]
    try:
        assert sorted(s.first().opened.session_id for s in held[:2]) == ["s0", "s1"]
        assert agent.servicer.sessions.wait_held(4, WAIT)
        assert refusal(open_stream(agent, 0)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with AgentClient(agent.tcp, agent.auth.as_uid(0), timeout=WAIT) as c:
            assert c.caller_id(CONN).job_id == "42"
            assert c.whois(CONN).job_id == "42"
            assert [j.id for j in c.list_jobs().jobs] == ["42"]
            assert c.start_job("43", "bob").id == "43"
            assert c.end_job("43").job.id == "43"
    finally:
        end_all(held, shells)
    assert agent.servicer.sessions.wait_held(0, WAIT)
    assert all(s.cleaned.wait(WAIT) for s in shells.opened)


def test_a_slow_session_kill_does_not_stop_other_calls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling a session kills it from grpc's end-of-call callback, which runs in the
    server's one polling thread: a kill that takes long must not run there."""
    shells = FakeShells(slow_kill=True)
    for agent in start_agent(tmp_path, monkeypatch, shells=shells):
        stream = open_stream(agent, ALICE, OPEN_42)
        try:
            assert stream.first().opened.session_id == "s0"
            stream.call.cancel()
            session = shells.opened[0]
            assert session.kill_started.wait(WAIT)
            with AgentClient(agent.tcp, agent.auth.as_uid(0), timeout=WAIT) as c:
                assert c.list_jobs().node == "testnode"
        finally:
            end_all([stream], shells)
        assert session.cleaned.wait(WAIT)
        assert agent.servicer.sessions.wait_held(0, WAIT)


@pytest.mark.parametrize("frames, code, details", [
    ([], grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send `open` first"),
    ([pb.ShellFrame(eof=True)], grpc.StatusCode.INVALID_ARGUMENT,
     "the first frame must be `open`"),
    ([pb.ShellFrame(open=pb.ShellOpen(job_id="77", public_key="k"))],
     grpc.StatusCode.NOT_FOUND, "no job 77 on testnode"),
])
def test_every_refused_stream_gives_its_place_back(
        capped: Agent, frames: list[pb.ShellFrame], code: grpc.StatusCode,
        details: str) -> None:
    for _ in range(3):  # more than the per-user cap: a leaked place would refuse the last
        with capped.client(ALICE) as c:
            with pytest.raises(grpc.RpcError) as e:
                next(c.open_job_shell(iter(frames)))
        assert (e.value.code(), e.value.details()) == (code, details)
        assert capped.servicer.sessions.wait_held(0, WAIT)


def test_ssh_to_job_says_too_many_sessions(capped: Agent, shells: FakeShells,
                                           tmp_path: Path) -> None:
    held = [open_stream(capped, ALICE), open_stream(capped, ALICE)]
    try:
        assert capped.servicer.sessions.wait_held(2, WAIT)
        (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA k\n")
        err = io.StringIO()
        error = stj.relay(target=capped.tcp, job_id="42", pubkey=str(tmp_path / "key.pub"),
                          known_hosts=str(tmp_path / "known_hosts"), alias="job.42",
                          shells=[], auth=capped.auth.as_uid(ALICE), connect=lambda: None,
                          err=err)
    finally:
        end_all(held, shells)
    assert error == ("Too many sessions: uid 1001 already has 2 ssh-to-job sessions on "
                     "testnode (max_sessions_per_user)")


# What ssh does with its ProxyCommand (ProxyUseFdpass): run it with a socket for stdout,
# take the connection it passes, send the banner, read; complain at an early EOF.
FAKE_SSH = """
import socket, subprocess, sys
mine, proxy_side = socket.socketpair()
subprocess.run(sys.argv[1:], stdout=proxy_side, check=True)
_, fds, _, _ = socket.recv_fds(mine, 1, 1)
conn = socket.socket(fileno=fds[0])
conn.sendall(b"SSH-2.0-fake\\r\\n")
if not conn.recv(1):
    sys.stderr.write("fake ssh: Connection closed by remote host\\n")
    sys.exit(255)
"""


def test_ssh_to_job_ends_ssh_silently_when_refused(capped: Agent, shells: FakeShells,
                                                   tmp_path: Path) -> None:
    """The real Relay and fdpass.py: refused before a session, ssh-to-job ends ssh (which
    would otherwise complain about its proxy) before it prints anything."""
    held = [open_stream(capped, ALICE), open_stream(capped, ALICE)]
    tmp = tmp_path / "t"
    tmp.mkdir(mode=0o700)
    (tmp / "key.pub").write_text("ssh-ed25519 AAAA k\n")
    relay = stj.Relay(target=capped.tcp, job_id="42", tmp=str(tmp), shells=[],
                      auth=capped.auth.as_uid(ALICE), err=io.StringIO())
    try:
        assert capped.servicer.sessions.wait_held(2, WAIT)
        relay.start()
        ssh = subprocess.run([sys.executable, "-c", FAKE_SSH, *stj.proxy_argv(relay.sock_path)],
                             stderr=subprocess.PIPE, text=True, timeout=WAIT)
    finally:
        relay.close()
        end_all(held, shells)
    assert (ssh.returncode, ssh.stderr) == (-signal.SIGTERM, "")
    assert relay.silenced
    assert relay.error == ("Too many sessions: uid 1001 already has 2 ssh-to-job sessions on "
                           "testnode (max_sessions_per_user)")


def test_a_stream_credential_for_another_first_frame_opens_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells) -> None:
    """A stream's credential binds its first frame: bob's credential with another key in
    `open` (what a thief of the credential would send) opens no session and frees its
    place under the caps."""
    for agent in start_agent(tmp_path, monkeypatch, shells=shells,
                             limits=SessionLimits(4, 2)):
        cred = agent.auth.as_uid(BOB).encode(
            Claim(shellwire.METHOD, "ip:127.0.0.1", digest(OPEN_42)).payload(),
            restrict_uid=0)
        forged = pb.ShellFrame(open=pb.ShellOpen(job_id="42",
                                                 public_key="ssh-ed25519 BBBB thief"))
        with grpc.insecure_channel(agent.tcp) as channel:
            call = channel.stream_stream(shellwire.METHOD,
                                         request_serializer=shellwire.serialize,
                                         response_deserializer=shellwire.parse)
            with pytest.raises(grpc.RpcError) as e:
                next(iter(call(iter([forged]), metadata=(("x-munge-cred", cred),), timeout=WAIT)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.details() == "MUNGE credential was not minted for this request"
        assert shells.opened == []
        assert agent.servicer.sessions.wait_held(0, WAIT)


def test_adoptctl_job_show_and_end_take_job_at_node(agent: Agent,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`adoptctl job show/end 42@NODE` ask NODE's agent (at the configured port), as
    ssh-to-job does: the reference `adoptctl jobs` prints is usable from any node."""
    from node_agent import config as config_mod
    from node_agent.config import AgentConfig

    port = int(agent.tcp.rsplit(":", 1)[1])
    monkeypatch.setattr(config_mod, "find", lambda explicit=None: AgentConfig(
        port=port, socket="/nonexistent/agent.sock"))
    agent.client(0).start_job("42", "alice")

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = adoptctl_main(list(argv), out=out, err=err, authenticator=agent.auth.as_uid(0))
        return rc, out.getvalue(), err.getvalue()

    rc, out, err = run("job", "show", "42@127.0.0.1")
    assert rc == 0 and "job         42\n" in out, err
    rc, out, err = run("--agent", agent.tcp, "job", "show", "42@127.0.0.1")
    assert rc == 2 and "leave out --agent" in err
    rc, out, err = run("job", "show", "42@bad:node")
    assert rc == 2 and err.startswith("adoptctl: Usage: bad node in job reference")
    rc, out, err = run("job", "end", "42@127.0.0.1")
    assert rc == 0 and out.startswith("job 42 ended on testnode"), err


# -- ssh-to-job -remove-on-interrupt: the real relay and servicer, a fake session ---------

class _SshEnd:
    """ssh's end of a relay: sends nothing, and reaches EOF when told (ssh is gone)."""

    def __init__(self) -> None:
        self.eof = threading.Event()

    def read(self, n: int) -> list[bytes]:
        self.eof.wait(WAIT)
        return []

    def write(self, data: bytes | memoryview) -> None:
        pass

    def close_write(self) -> None:
        pass


def _relay_with_removal(target: str, auth: FakeAuthenticator, tmp_path: Path,
                        ) -> tuple[stj.Removal, _SshEnd, threading.Thread, list[str]]:
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA k\n")
    removal, end, result = stj.Removal(), _SshEnd(), []

    def run() -> None:
        result.append(stj.relay(
            target=target, job_id="42", pubkey=str(tmp_path / "key.pub"),
            known_hosts=str(tmp_path / "known_hosts"), alias="job.42", shells=[], auth=auth,
            connect=lambda: end, err=io.StringIO(), removal=removal))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return removal, end, t, result


def test_remove_on_interrupt_ends_the_job_and_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells) -> None:
    for agent in start_agent(tmp_path, monkeypatch, shells=shells):
        agent.registry.start("42", "alice")
        removal, end, t, result = _relay_with_removal(agent.tcp, agent.auth.as_uid(ALICE),
                                                      tmp_path)
        assert removal.granted.wait(WAIT)       # the agent said it would
        end.eof.set()                           # ssh is gone: it had the SIGINT too
        removal.decide(remove=True)             # and so had ssh-to-job
        deadline = time.monotonic() + WAIT
        while agent.registry.get("42") is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.registry.get("42") is None  # ended, and forgotten
        shells.opened[0].kill()                 # (its sshd dies with the job's cgroups)
        t.join(WAIT)
        assert result == [""]
        assert removal.answer is not None
        assert (removal.answer.error, removal.answer.killed) == ("", 0)  # (no process)


def test_remove_on_interrupt_without_an_interrupt_keeps_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells) -> None:
    for agent in start_agent(tmp_path, monkeypatch, shells=shells):
        agent.registry.start("42", "alice")
        removal, end, t, result = _relay_with_removal(agent.tcp, agent.auth.as_uid(ALICE),
                                                      tmp_path)
        assert removal.granted.wait(WAIT)
        end.eof.set()
        shells.opened[0].kill()                 # the session ended on its own
        removal.decide(remove=False)            # ssh exited normally (Relay.close)
        removal.decide(remove=True)             # a late Ctrl-C changes nothing
        t.join(WAIT)
        assert not t.is_alive() and result == [""]
        assert removal.answer is None
        assert agent.registry.get("42") is not None


def test_remove_on_interrupt_is_refused_before_a_session_where_jobs_are_the_schedulers(
        shells: FakeShells, tmp_path: Path) -> None:
    from tests.unit.fakes import FakeBackend

    auth = FakeAuthenticator()
    servicer = NodeAgentServicer(node="slurmnode", resolver=FakeResolver(),  # type: ignore[arg-type]
                                 jobs=FakeBackend("slurmnode"), shells=shells)  # type: ignore[arg-type]
    server, ports = create_server(servicer, auth, ["127.0.0.1:0"])
    server.start()
    try:
        removal, end, t, result = _relay_with_removal(f"127.0.0.1:{ports[0]}",
                                                      auth.as_uid(ALICE), tmp_path)
        t.join(WAIT)
    finally:
        server.stop(0)
    assert result == ["Not supported: -remove-on-interrupt: jobs on slurmnode are ended by "
                      "their scheduler, not by the agent (end job 42 with the scheduler, e.g. "
                      "scancel)"]
    assert shells.opened == []                  # no session was opened, no sshd started
    assert not removal.granted.is_set()


def test_remove_on_a_session_opened_without_it_ends_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shells: FakeShells) -> None:
    """A hand-made client's `remove` in a plain session (not granted at open) is ignored:
    the right comes with the open, never with a later frame."""
    sent = threading.Event()
    for agent in start_agent(tmp_path, monkeypatch, shells=shells):
        agent.registry.start("42", "alice")

        def frames() -> Iterator[pb.ShellFrame]:
            yield OPEN_42
            yield pb.ShellFrame(remove=True)
            yield pb.ShellFrame(eof=True)
            sent.set()

        with agent.client(ALICE) as c:
            call = c.open_job_shell(frames())
            first = next(call)
            assert first.opened.session_id and not first.opened.remove_on_interrupt
            assert sent.wait(WAIT)
            time.sleep(0.5)   # (the agent has read them: the stream is in order)
            assert agent.registry.get("42") is not None
            shells.opened[0].kill()
            rest = list(call)
        assert not any(not isinstance(f, memoryview) and f.HasField("removed") for f in rest)
        assert agent.registry.get("42") is not None
