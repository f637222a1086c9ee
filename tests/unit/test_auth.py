"""Credentials mean one thing, at one place, once; and clients authenticate the agent.

In-process gRPC on 127.0.0.1:0 with the fake MUNGE (tests/unit/fakes.py), which keeps
munged's rules that matter here: one decode per credential, and a credential restricted
to a uid decodes only for that uid. A "squatter" is a plain gRPC server without the
agent's interceptor: what a user would run on the agent's port while the agent is down.
"""

from __future__ import annotations

import io
import ipaddress
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

import callerid
from callerid._ifaddr import (
    IFA_ADDRESS,
    IFA_LOCAL,
    NLMSG_DONE,
    RTM_NEWADDR,
    parse_addr_messages,
)
from node_agent import shellwire
from node_agent.auth import (
    REPLY_KEY,
    AuthInterceptor,
    Claim,
    NodeTargets,
    digest,
    reply_payload,
    target_claim,
)
from node_agent.cli import ssh_to_job as stj
from node_agent.client import AgentClient
from node_agent.errors import AuthError, ImpostorError
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc
from tests.unit.fakes import FakeAuthenticator

ALICE, BOB = 1001, 1002

if TYPE_CHECKING:   # generic in grpc-stubs only: at run time the class takes no parameters
    GenericRpcHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    GenericRpcHandler = grpc.GenericRpcHandler
WAIT = 30.0  # generous: only reached when something is wrong
SERVICE = "callerid_adopt.v1.NodeAgent"
LIST_JOBS = f"/{SERVICE}/ListJobs"
OPEN_SHELL = f"/{SERVICE}/OpenJobShell"


class Squatter:
    """Answers every NodeAgent method like an agent would, records the metadata it got,
    and adds `reply_metadata()` (nothing by default) as its initial metadata."""

    def __init__(self) -> None:
        self.captured: list[tuple[str, dict[str, str]]] = []
        self.captured_open: pb.ShellFrame | None = None   # the first frame of an OpenJobShell
        self.reply_metadata: Callable[[dict[str, str]], list[tuple[str, str]]] = lambda md: []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((_SquatHandler(self),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"ipv4:127.0.0.1:{self.port}"

    def answer(self, method: str, context: grpc.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.captured.append((method, md))
        extra = self.reply_metadata(md)
        if extra:   # where the agent puts its proof: see node_agent.auth
            if method == OPEN_SHELL:
                context.send_initial_metadata(tuple(extra))
            else:
                context.set_trailing_metadata(tuple(extra))

    def stop(self) -> None:
        self.server.stop(0)


class _SquatHandler(GenericRpcHandler):
    def __init__(self, squatter: Squatter) -> None:
        self.s = squatter

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method == LIST_JOBS:
            def list_jobs(req: bytes, ctx: grpc.ServicerContext) -> bytes:
                self.s.answer(method, ctx)
                return pb.ListJobsReply(node="node1", jobs=[pb.Job(
                    id="b7", user="bob", uid=BOB, state="running", node="node1")]
                ).SerializeToString()
            return grpc.unary_unary_rpc_method_handler(list_jobs)
        if method == OPEN_SHELL:
            def open_shell(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
                self.s.captured_open = pb.ShellFrame.FromString(next(reqs))
                self.s.answer(method, ctx)
                yield pb.ShellFrame(opened=pb.ShellOpened(
                    host_key="ssh-ed25519 AAAA", node="node1", user="bob",
                    session_id="x")).SerializeToString()
            return grpc.stream_stream_rpc_method_handler(open_shell)
        return None


@pytest.fixture
def squatter() -> Iterator[Squatter]:
    s = Squatter()
    try:
        yield s
    finally:
        s.stop()


class RealAgent(agent_pb2_grpc.NodeAgentServicer):
    """The agent's interceptor over a minimal servicer, accepting `targets` only."""

    def __init__(self) -> None:
        self.opened: list[pb.ShellOpen] = []

    def ListJobs(self, request: pb.ListJobsRequest,
                 context: grpc.ServicerContext) -> pb.ListJobsReply:
        return pb.ListJobsReply(node="node2")

    def OpenJobShell(self, request_iterator: Iterator[pb.ShellFrame],
                     context: grpc.ServicerContext) -> Iterator[pb.ShellFrame]:
        first = next(request_iterator)
        self.opened.append(first.open)
        yield pb.ShellFrame(opened=pb.ShellOpened(host_key="k", node="node2"))


@pytest.fixture
def make_agent() -> Iterator[Callable[[FakeAuthenticator, set[str]], tuple[RealAgent, str]]]:
    servers: list[grpc.Server] = []

    def make(auth: FakeAuthenticator, targets: set[str]) -> tuple[RealAgent, str]:
        # The stubs declare every method abstract; at run time the rest answer UNIMPLEMENTED.
        servicer = RealAgent()  # type: ignore[abstract]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             interceptors=[AuthInterceptor(auth, targets)])
        agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"ipv4:127.0.0.1:{port}"

    yield make
    for s in servers:
        s.stop(0)


# -- the client refuses whatever is not the agent ------------------------------------------

def test_client_refuses_an_answer_without_the_agents_credential(squatter: Squatter) -> None:
    auth = FakeAuthenticator().as_uid(BOB)
    with AgentClient(squatter.target, auth, timeout=5) as c, \
            pytest.raises(ImpostorError, match="is not root on the node meant: its answer "
                          "carries no credential"):
        c.list_jobs(job_id="b7")
    assert squatter.captured  # it did get the call: what it got is useless (below)


def test_client_refuses_an_answer_signed_by_a_user(squatter: Squatter) -> None:
    munge = FakeAuthenticator()
    alice = munge.as_uid(ALICE)
    squatter.reply_metadata = lambda md: [(REPLY_KEY, alice.encode(
        reply_payload(LIST_JOBS, md["x-munge-cred"]), restrict_uid=BOB))]
    with AgentClient(squatter.target, munge.as_uid(BOB), timeout=5) as c, \
            pytest.raises(ImpostorError, match="signed by uid 1001"):
        c.list_jobs(job_id="b7")


def test_client_refuses_a_genuine_reply_credential_of_another_call(
        squatter: Squatter, make_agent: Any) -> None:
    """Root's reply to some other call (relayed by the squatter) proves nothing."""
    munge = FakeAuthenticator()
    _agent, real = make_agent(munge, {"ip:127.0.0.1"})
    bob = munge.as_uid(BOB)
    channel = grpc.insecure_channel(real)
    stub = agent_pb2_grpc.NodeAgentStub(channel)
    req = pb.ListJobsRequest()
    cred = bob.encode(Claim(LIST_JOBS, "ip:127.0.0.1", digest(req)).payload(), restrict_uid=0)
    _, call = stub.ListJobs.with_call(req, timeout=5, metadata=(("x-munge-cred", cred),))
    genuine = dict(call.trailing_metadata())[REPLY_KEY]
    assert isinstance(genuine, str)
    channel.close()
    squatter.reply_metadata = lambda md: [(REPLY_KEY, genuine)]
    with AgentClient(squatter.target, bob, timeout=5) as c, \
            pytest.raises(ImpostorError, match="made for another request"):
        c.list_jobs(job_id="b7")


def test_client_accepts_the_real_agent(make_agent: Any) -> None:
    munge = FakeAuthenticator()
    _agent, real = make_agent(munge, {"ip:127.0.0.1"})
    with AgentClient(real, munge.as_uid(BOB), timeout=5) as c:
        assert c.list_jobs().node == "node2"


# -- what a squatter captures is useless -----------------------------------------------------

def test_captured_credentials_cannot_be_read_or_used_on_another_node(
        squatter: Squatter, make_agent: Any) -> None:
    munge = FakeAuthenticator()
    bob, alice = munge.as_uid(BOB), munge.as_uid(ALICE)
    with AgentClient(squatter.target, bob, timeout=5) as c, pytest.raises(ImpostorError):
        c.list_jobs(job_id="b7")
    (_method, md), = squatter.captured
    stolen = md["x-munge-cred"]
    with pytest.raises(AuthError, match="Unauthorized"):
        alice.decode(stolen)                       # only root may read it
    # node2's agent (127.0.0.1 plays node2: its addresses are not the squatted node's)
    _agent, node2 = make_agent(munge, {"ip:10.77.0.12", "node:node2"})
    channel = grpc.insecure_channel(node2)
    stub = agent_pb2_grpc.NodeAgentStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.ListJobs(pb.ListJobsRequest(job_id="b7"), timeout=5,
                      metadata=(("x-munge-cred", stolen),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not for this node" in (e.value.details() or "")
    channel.close()


def test_squatted_ssh_to_job_is_one_line_and_its_open_frame_is_useless(
        squatter: Squatter, make_agent: Any, tmp_path: Path) -> None:
    """bob's ssh-to-job meets a squatter: the relay refuses it with one line and writes
    no known_hosts; the captured credential replayed with alice's key at the real agent of
    that node (same address) opens nothing: it was minted for bob's first frame."""
    munge = FakeAuthenticator()
    bob = munge.as_uid(BOB)
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAAbob bob\n")
    got = stj.relay(target=squatter.target, job_id="b7", pubkey=str(tmp_path / "key.pub"),
                    known_hosts=str(tmp_path / "known_hosts"), alias="job-b7", shells=[],
                    auth=bob, connect=lambda: None, err=io.StringIO())
    assert got.startswith("Authentication failed: the agent at ipv4:127.0.0.1:")
    assert "is not root on the node meant" in got
    assert not (tmp_path / "known_hosts").exists()
    stolen = dict(squatter.captured[0][1])["x-munge-cred"]
    agent, real = make_agent(munge, {"ip:127.0.0.1"})
    forged = pb.ShellFrame(open=pb.ShellOpen(job_id="b7", public_key="ssh-ed25519 AAAAalice"))
    channel = grpc.insecure_channel(real)
    call = channel.stream_stream(OPEN_SHELL, request_serializer=shellwire.serialize,
                                 response_deserializer=shellwire.parse)
    with pytest.raises(grpc.RpcError) as e:
        list(call(iter([forged]), timeout=5, metadata=(("x-munge-cred", stolen),)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not minted for this request" in (e.value.details() or "")
    assert agent.opened == []
    channel.close()


def test_stream_claim_binds_the_first_frame(make_agent: Any) -> None:
    munge = FakeAuthenticator()
    agent, real = make_agent(munge, {"ip:127.0.0.1"})
    first = pb.ShellFrame(open=pb.ShellOpen(job_id="b7", public_key="ssh-ed25519 AAAAbob"))
    with AgentClient(real, munge.as_uid(BOB), timeout=5) as c:
        frames = c.open_job_shell(iter([first]))
        assert next(frames).opened.node == "node2"
        frames.cancel()
    assert [o.public_key for o in agent.opened] == ["ssh-ed25519 AAAAbob"]


# -- the pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "claim"), [
    ("unix:/run/callerid-adopt/agent.sock", "node:node1"),
    ("ipv4:10.77.0.11:411", "ip:10.77.0.11"),
    ("ipv6:[fd77::11]:411", "ip:fd77::11"),
    ("ipv6:[::ffff:10.77.0.11]:411", "ip:10.77.0.11"),
    ("10.77.0.11:411", "ip:10.77.0.11"),
    ("[fd77::11]:411", "ip:fd77::11"),
])
def test_target_claim(target: str, claim: str) -> None:
    assert target_claim(target, "node1") == claim


def test_claim_round_trip_and_refusals() -> None:
    c = Claim(LIST_JOBS, "node:n1", "ab")
    assert Claim.parse(c.payload()) == c
    with pytest.raises(AuthError, match="not minted by callerid-adopt"):
        Claim.parse(b"/callerid_adopt.v1.NodeAgent/ListJobs")
    with pytest.raises(AuthError, match="protocol 'callerid-adopt/0'"):
        Claim.parse(b"callerid-adopt/0 m t b")
    with pytest.raises(AuthError):
        Claim.parse(b"\xff\xfe")


def test_digest_is_independent_of_map_order() -> None:
    a = pb.StartJobRequest(job_id="1", user="u", env={"A": "1", "B": "2"})
    b = pb.StartJobRequest(job_id="1", user="u", env={"B": "2", "A": "1"})
    assert digest(a) == digest(b)
    assert digest(a) != digest(pb.StartJobRequest(job_id="1", user="u", env={"A": "2"}))


def test_node_targets_fixed() -> None:
    t = NodeTargets("node1", ["10.77.0.11", "fd77::11"])
    assert "node:node1" in t and "ip:10.77.0.11" in t and "ip:fd77::11" in t
    assert "ip:::ffff:10.77.0.11" in t
    for other in ("node:node2", "ip:10.77.0.12", "ip:bogus", "host:node1", "", 42):
        assert other not in t


def test_node_targets_reads_this_namespaces_addresses_and_rereads_rarely(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    addrs = [frozenset({ipaddress.ip_address("10.0.0.1")})]

    def fake() -> frozenset[Any]:
        reads.append(1)
        return addrs[0]

    monkeypatch.setattr("node_agent.auth.local_addresses", fake)
    t = NodeTargets("n", refresh_interval=3600)
    assert "ip:10.0.0.1" in t and len(reads) == 1
    addrs[0] = frozenset({ipaddress.ip_address("10.0.0.2")})
    for _ in range(50):
        assert "ip:10.0.0.2" not in t   # unknown claims cannot make it re-read in a loop
    assert len(reads) == 1
    t2 = NodeTargets("n", refresh_interval=0)
    assert "ip:10.0.0.2" in t2
    addrs[0] = frozenset({ipaddress.ip_address("10.0.0.3")})
    assert "ip:10.0.0.3" in t2          # an address added since is found on a miss


def test_local_addresses_live() -> None:
    found = callerid.local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found


def _nlmsg(kind: int, body: bytes) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body
    return data + bytes(-len(data) % 4)


def _rta(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)


def test_parse_addr_messages() -> None:
    """Two RTM_NEWADDR messages as the kernel sends them (a point-to-point v4 address with
    IFA_LOCAL and the peer in IFA_ADDRESS; a v6 address), then NLMSG_DONE."""
    v4 = _nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", 2, 32, 0, 0, 3)
                + _rta(IFA_ADDRESS, bytes([10, 0, 0, 2])) + _rta(IFA_LOCAL, bytes([10, 0, 0, 1])))
    v6 = _nlmsg(RTM_NEWADDR, struct.pack("=BBBBI", 10, 64, 0, 0, 3)
                + _rta(IFA_ADDRESS, ipaddress.IPv6Address("fd77::11").packed))
    done = _nlmsg(NLMSG_DONE, struct.pack("=i", 0))
    addrs, finished = parse_addr_messages(v4 + v6)
    assert [str(a) for a in addrs] == ["10.0.0.1", "fd77::11"] and not finished
    assert parse_addr_messages(done) == ([], True)


def test_concurrent_calls_each_verified(make_agent: Any) -> None:
    munge = FakeAuthenticator()
    _agent, real = make_agent(munge, {"ip:127.0.0.1"})
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with AgentClient(real, munge.as_uid(BOB), timeout=5) as c:
                for _ in range(5):
                    c.list_jobs()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_futures_stay_asynchronous_and_are_verified(squatter: Squatter, make_agent: Any) -> None:
    """`.future()` through the credential plugin does not wait for the answer (many calls
    can be in flight), and its result is only handed out once the agent's proof checked
    out."""
    munge = FakeAuthenticator()
    _agent, real = make_agent(munge, {"ip:127.0.0.1"})
    gate = threading.Event()

    def once_let_go(md: dict[str, str]) -> list[tuple[str, str]]:
        gate.wait(WAIT)   # answers once let go
        return []

    squatter.reply_metadata = once_let_go
    with AgentClient(squatter.target, munge.as_uid(BOB), timeout=WAIT) as c:
        pending = [c.stub.ListJobs.future(pb.ListJobsRequest(), timeout=WAIT)
                   for _ in range(3)]
        assert not any(f.done() for f in pending)   # issued without waiting
        gate.set()
        for f in pending:
            assert isinstance(f.exception(), ImpostorError)
            with pytest.raises(ImpostorError):
                f.result()
        done: list[Any] = []
        f = c.stub.ListJobs.future(pb.ListJobsRequest(), timeout=WAIT)
        f.add_done_callback(done.append)
        with pytest.raises(ImpostorError):
            f.result()
        assert done and done[0] is f   # the callback gets the verifying future
    with AgentClient(real, munge.as_uid(BOB), timeout=WAIT) as c:
        futures_ = [c.stub.ListJobs.future(pb.ListJobsRequest(), timeout=WAIT)
                    for _ in range(20)]
        assert [f.result().node for f in futures_] == ["node2"] * 20
