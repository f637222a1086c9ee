"""The agent's admission decisions (node_agent.agent.admission) and its root-only socket.

A real JobRegistry on a fake cgroup tree; a fake caller-ID function instead of the
source node's agent; real Unix sockets. Stale requests (deadline passed, connection
closed, caller exited) and the per-user fairness of the worker pool are checked by the
order of events, not by timing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import grpc
import pytest

import node_agent.agent.admission as admission_mod
from callerid import CgroupLayout, Connection, Hierarchy
from node_agent import jobenv, pamcontract
from node_agent.agent.admission import (
    PER_USER,
    Admission,
    AdmissionServer,
    Dropped,
    FairPool,
    Peer,
    parse_ssh_connection,
)
from node_agent.jobs import JobRecord
from node_agent.jobs.native import ADOPTED_LEAF, JobRegistry
from node_agent.pamcontract import (
    ALLOW,
    DENY,
    IGNORE,
    MSG_BUSY,
    MSG_NO_JOBS,
    MSG_UNKNOWN,
    Reply,
    Request,
    decode_reply,
    encode_request,
)

PEER = Peer(pid=4321, uid=0, gid=0)
SSH = "10.0.0.1 40000 10.0.0.2 22"


class FakeCallerId:
    def __init__(self) -> None:
        self.answer: str | None = None
        self.error: grpc.RpcError | None = None
        self.calls: list[tuple[str, Connection, float]] = []

    def __call__(self, host: str, conn: Connection, deadline: float) -> str | None:
        self.calls.append((host, conn, deadline))
        if self.error is not None:
            raise self.error
        return self.answer


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "Deadline Exceeded"


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobRegistry]:
    import pwd as pwd_mod

    def getpwnam(name: str) -> pwd_mod.struct_passwd:
        uid = {"alice": 1001, "bob": 1002}[name]
        return pwd_mod.struct_passwd((name, "x", uid, uid, "", f"/home/{name}", "/bin/sh"))

    monkeypatch.setattr("node_agent.jobs.native.pwd.getpwnam", getpwnam)
    root = tmp_path / "cg"
    hier = (Hierarchy("freezer", 1, root / "freezer"), Hierarchy("unified", 2, root / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    reg = JobRegistry(tmp_path / "state", CgroupLayout(hier, "callerid"), node="n2")
    reg.recover()
    yield reg
    reg.close()


def request(user: str = "alice", ssh: str = SSH, **fields: str | float) -> Request:
    return Request(user=user, service="sshd", rhost="10.0.0.1", ssh_connection=ssh,
                   **fields)  # type: ignore[arg-type]


def adopted_pids(reg: JobRegistry, job: str) -> list[set[str]]:
    out = []
    for h in reg.layout.hierarchies:
        procs = reg.layout.leaf_path(h, job, ADOPTED_LEAF) / "cgroup.procs"
        out.append(set(procs.read_text().split()) if procs.exists() else set())
    return out


def two_jobs_of_alice(registry: JobRegistry) -> FakeCallerId:
    """Jobs A and then B of alice (B the newest); a caller-ID fake that answers nothing yet."""
    registry.start("A", "alice")
    time.sleep(0.01)
    registry.start("B", "alice")
    return FakeCallerId()


def test_no_jobs_denies_with_the_sentence_or_ignores(registry: JobRegistry) -> None:
    adm = Admission(registry, FakeCallerId())
    r = adm.decide(request(), PEER)
    assert (r.decision, r.reason, r.message) == (DENY, "no-jobs", MSG_NO_JOBS)
    assert MSG_NO_JOBS == "Access denied by pam_adopt: you have no active jobs on this node"
    r = adm.decide(request(action_no_jobs="ignore"), PEER)
    assert r.decision == IGNORE


def test_another_users_job_does_not_admit(registry: JobRegistry) -> None:
    registry.start("7", "bob")
    r = Admission(registry, FakeCallerId()).decide(request("alice"), PEER)
    assert r.decision == DENY and r.reason == "no-jobs"


def test_one_job_adopts_without_asking_anyone(registry: JobRegistry) -> None:
    registry.start("42", "alice")
    cid = FakeCallerId()
    r = Admission(registry, cid).decide(request(), PEER)
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "one-job", "42")
    assert r.env[jobenv.JOB_ID] == "42"
    assert cid.calls == []
    assert adopted_pids(registry, "42") == [{"4321"}, {"4321"}]


def test_several_jobs_ask_the_source_node(registry: JobRegistry) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = "A"
    adm = Admission(registry, cid, rpc_timeout=5.0)
    r = adm.decide(request(timeout=2.0), PEER)
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "caller-id", "A")
    host, conn, deadline = cid.calls[0]
    # The source node's view: the ssh client's end is local there.
    assert host == "10.0.0.1" and (conn.local.port, conn.remote.port) == (40000, 22)
    assert deadline <= 2.0 * 0.6 + 1e-9  # inside the module's timeout
    assert adopted_pids(registry, "A") == [{"4321"}, {"4321"}]


@pytest.mark.parametrize("answer, error", [(None, False), ("other-users-job", False),
                                           (None, True)])
def test_unknown_source_applies_action_unknown(registry: JobRegistry, answer: str | None,
                                               error: bool) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = answer
    cid.error = Unavailable() if error else None
    adm = Admission(registry, cid)
    r = adm.decide(request(), PEER)  # default: newest
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "unknown-newest", "B")
    r = adm.decide(request(action_unknown="allow"), Peer(99, 0, 0))
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "unknown-allow", "")
    r = adm.decide(request(action_unknown="deny"), Peer(98, 0, 0))
    assert (r.decision, r.message) == (DENY, MSG_UNKNOWN)
    assert "99" not in adopted_pids(registry, "A")[0] | adopted_pids(registry, "B")[0]
    if error:
        assert "DEADLINE_EXCEEDED" in r.detail


def test_time_spent_waiting_for_the_agent_comes_off_the_call(registry: JobRegistry) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = "A"
    adm = Admission(registry, cid)
    # Waited 0.5 s of a 2 s module timeout: the call gets what is left of its 60 %.
    r = adm.decide(request(timeout=2.0), PEER, received=time.monotonic() - 0.5)
    assert r.job_id == "A"
    assert 0.6 < cid.calls[0][2] <= 2.0 * 0.6 - 0.5 + 1e-9
    # Waited past the call's share: no call at all, straight to action_unknown (newest).
    r = adm.decide(request(timeout=2.0), PEER, received=time.monotonic() - 1.3)
    assert len(cid.calls) == 1
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "unknown-newest", "B")
    assert "no time left to ask 10.0.0.1" in r.detail and "waited 13" in r.detail


def test_missing_ssh_connection_never_calls_out(registry: JobRegistry) -> None:
    registry.start("A", "alice")
    registry.start("B", "alice")
    cid = FakeCallerId()
    r = Admission(registry, cid).decide(request(ssh="", action_unknown="deny"), PEER)
    assert r.decision == DENY and "SSH_CONNECTION" in r.detail
    assert cid.calls == []


def test_adoption_failure(registry: JobRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.start("42", "alice")

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry, "adopt", boom)
    adm = Admission(registry, FakeCallerId())
    r = adm.decide(request(), PEER)
    assert (r.decision, r.reason) == (DENY, "adopt-failed")
    assert "could not be added to your job" in r.message
    r = adm.decide(request(action_adopt_failure="allow"), PEER)
    assert (r.decision, r.job_id) == (ALLOW, "")


def test_bad_option_values_fall_back_to_defaults(registry: JobRegistry) -> None:
    r = Admission(registry, FakeCallerId()).decide(request(action_no_jobs="maybe"), PEER)
    assert r.decision == DENY  # the default, not an error


@pytest.mark.parametrize("text, ok", [
    (SSH, True), ("::ffff:10.0.0.1 40000 ::ffff:10.0.0.2 22", True),
    ("fd00::1 40000 fd00::2 22", True), ("", False), ("10.0.0.1 40000 10.0.0.2", False),
    ("10.0.0.1 port 10.0.0.2 22", False), ("10.0.0.1 99999 10.0.0.2 22", False),
])
def test_parse_ssh_connection(text: str, ok: bool) -> None:
    conn = parse_ssh_connection(text)
    assert (conn is not None) == ok
    if conn is not None:
        assert conn.local.port == 40000 and conn.remote.port == 22
        assert not str(conn.local.ip).startswith("::ffff:")


# -- the socket ------------------------------------------------------------------------------
# It answers root only (SO_PEERCRED): a test that expects any other answer than "not-root"
# from it is marked `root`, and runs as root (`make test`, CI) or not at all.

def exchange(path: Path, data: bytes, timeout: float = 5) -> bytes:
    """Send one request, read the answer up to the agent's close (b"": none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        return read_to_end(s)


def read_to_end(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def ask(path: Path, data: bytes) -> Reply:
    return decode_reply(exchange(path, data))


def closed_without_answer(s: socket.socket) -> bool:
    """The agent closed `s` without a reply (a reset when our bytes were left unread)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server(registry: JobRegistry, tmp_path: Path) -> Iterator[tuple[AdmissionServer, Path]]:
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, FakeCallerId()))
    srv.start()
    yield srv, path
    srv.close()


@pytest.mark.root
def test_socket_is_root_only_and_answers(server: tuple[AdmissionServer, Path],
                                         registry: JobRegistry) -> None:
    _, path = server
    assert path.stat().st_mode & 0o777 == 0o600
    registry.start("42", "alice")
    reply = ask(path, line_of(request()))
    assert reply.decision == "ALLOW" and reply.job_id == "42"
    assert reply.env == jobenv.of_job("42", "n2")
    # The pid adopted is the caller's, from SO_PEERCRED: this test process.
    assert str(os.getpid()) in adopted_pids(registry, "42")[0]


@pytest.mark.root
@pytest.mark.parametrize("line, why", [
    (b"not a request\n", "the first line is 'not a request'"),
    (b"protocol=2\nuser\n\n", "is not key=value"),
    (b"protocol=2\nuser=alice\nnonsense=1\n\n", "unknown key 'nonsense'"),
    (b"protocol=2\nuser=alice\nuser=bob\n\n", "user given twice"),
    (b"protocol=2\nuser=alice\ntimeout=soon\n\n", "timeout='soon' is not a number"),
    (b"protocol=2\nservice=sshd\n\n", "no user"),
])
def test_malformed_requests_are_denied_clearly(server: tuple[AdmissionServer, Path],
                                               line: bytes, why: str) -> None:
    reply = ask(server[1], line)
    assert reply.decision == "DENY" and reply.reason == "bad-request"
    assert reply.message == pamcontract.MSG_BAD_REQUEST and why in reply.detail


OLD_MODULE_REQUEST = (b'{"user": "alice", "service": "sshd", "rhost": "10.0.0.1", '
                      b'"ssh_connection": "10.0.0.1 40000 10.0.0.2 22", "options": '
                      b'{"action_no_jobs": "deny", "timeout": 5.0}, "deadline": 1.0}\n')


@pytest.mark.root
@pytest.mark.parametrize("line", [OLD_MODULE_REQUEST, b"protocol=3\nuser=alice\n"])
def test_a_module_of_another_version_gets_a_clear_mismatch_at_once(
        server: tuple[AdmissionServer, Path], registry: JobRegistry, line: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    # An upgrade half done: the module's request is not in this agent's protocol. The
    # answer comes at once (not after a timeout), adopts nothing, and is no reply of any
    # version: a JSON module (before protocol 2) fails to parse it, applies its
    # action_generic_failure and logs its first 200 bytes, which say what happened.
    registry.start("42", "alice")
    t0 = time.monotonic()
    answer = exchange(server[1], line)
    assert time.monotonic() - t0 < 2
    assert answer == pamcontract.VERSION_MISMATCH_ANSWER
    assert answer[:200].startswith(b"version mismatch: ") and answer.endswith(b"\n")
    with pytest.raises(ValueError):
        json.loads(answer)
    with pytest.raises(pamcontract.WireError):
        decode_reply(answer)
    assert adopted_pids(registry, "42") == [set(), set()]
    assert "version mismatch" in caplog.text and "different callerid-adopt versions" in \
        caplog.text


@pytest.mark.root
def test_connection_without_request_is_closed_quietly(server: tuple[AdmissionServer, Path],
                                                      registry: JobRegistry) -> None:
    # pam_adopt.py connects before it knows it will ask (root logins, other services).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server[1]))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    registry.start("42", "alice")
    line = line_of(request())
    assert ask(server[1], line).decision == "ALLOW"  # still serving


@pytest.mark.root
def test_a_silent_client_does_not_hold_up_the_others(registry: JobRegistry,
                                                     tmp_path: Path) -> None:
    # One worker, and a client that connects and says nothing (a PAM process the machine
    # has not scheduled yet): the next request is answered anyway, the silent one dropped.
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, FakeCallerId()), workers=1,
                          io_timeout=1.0)
    srv.start()
    registry.start("42", "alice")
    line = line_of(request())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(str(path))
            t0 = time.monotonic()
            assert ask(path, line).decision == "ALLOW"
            assert time.monotonic() - t0 < 1.0  # not after the silent one's io_timeout
            silent.settimeout(10)
            assert silent.recv(100) == b""  # dropped after io_timeout, without an answer
            assert time.monotonic() - t0 >= 0.9
    finally:
        srv.close()


@pytest.mark.root
def test_a_request_sent_in_pieces_is_answered(server: tuple[AdmissionServer, Path],
                                              registry: JobRegistry) -> None:
    registry.start("42", "alice")
    line = line_of(request())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server[1]))
        for i in range(0, len(line), 7):
            s.sendall(line[i:i + 7])
            time.sleep(0.002)
        assert decode_reply(read_to_end(s)).job_id == "42"


@pytest.mark.root
def test_a_failing_decision_is_a_clear_denial_not_silence(registry: JobRegistry,
                                                          tmp_path: Path) -> None:
    class Broken(Admission):
        def decide(self, request: Request, peer: Peer,
                   received: float | None = None,
                   hung_up: Callable[[], bool] | None = None,
                   namespaces: list[int] | None = None) -> Reply:
            raise RuntimeError("registry on fire")

    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Broken(registry, FakeCallerId()))
    srv.start()
    try:
        line = line_of(request())
        reply = ask(path, line)
        assert (reply.decision, reply.reason) == ("DENY", "internal-error")
        assert "registry on fire" in str(reply.detail)
    finally:
        srv.close()


@pytest.mark.root
def test_a_connection_that_breaks_the_server_is_dropped_alone(
        server: tuple[AdmissionServer, Path], registry: JobRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = admission_mod._peercred
    calls = []

    def broken_once(conn: socket.socket) -> Peer:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(conn)

    monkeypatch.setattr(admission_mod, "_peercred", broken_once)
    registry.start("42", "alice")
    line = line_of(request())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server[1]))
        assert closed_without_answer(s)  # dropped at once, before it could even ask
    assert ask(server[1], line).decision == "ALLOW"  # the next login is served


def test_an_oversized_request_is_dropped(server: tuple[AdmissionServer, Path]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server[1]))
        try:
            s.sendall(b"x" * (70 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending
        assert closed_without_answer(s)


AS_NOBODY = """
import os, socket, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # before connecting: SO_PEERCRED is what the peer was at connect()
assert (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) == (65534, 65534, 65534, [])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
data = b""
while chunk := s.recv(4096):  # the agent closes after its answer
    data += chunk
sys.stdout.buffer.write(data)
"""


@pytest.mark.root
def test_the_socket_answers_root_and_refuses_any_other_uid(
        registry: JobRegistry, caplog: pytest.LogCaptureFixture) -> None:
    """The SO_PEERCRED rule both ways, with the same request line: from this process
    (root) it is answered and the caller adopted; from a child that setuid()s to 65534
    before it connects it is refused, and nothing is adopted. The socket's mode (0600)
    is opened up first, so that only the peer check stands in the way."""
    registry.start("42", "alice")
    d = Path(tempfile.mkdtemp(prefix="admission-test-"))  # tmp_path is not nobody's to enter
    d.chmod(0o755)
    path = d / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, FakeCallerId()))
    srv.start()
    try:
        path.chmod(0o666)
        line = line_of(request())
        child = subprocess.run([sys.executable, "-I", "-c", AS_NOBODY, str(path)], input=line,
                               capture_output=True, timeout=20)
        assert child.returncode == 0, child.stderr.decode()
        reply = decode_reply(child.stdout)
        assert (reply.decision, reply.reason) == ("DENY", "not-root")
        assert adopted_pids(registry, "42") == [set(), set()]
        assert "admission request from uid 65534 pid" in caplog.text
        assert "refused: only root may ask" in caplog.text
        reply = ask(path, line)
        assert (reply.decision, reply.job_id) == ("ALLOW", "42")
        assert adopted_pids(registry, "42") == [{str(os.getpid())}] * 2
    finally:
        srv.close()
        shutil.rmtree(d)


# -- only while the module still waits -------------------------------------------------------

def line_of(req: Request) -> bytes:
    return encode_request(req)


def test_an_expired_request_is_dropped_before_adoption(registry: JobRegistry,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    registry.start("42", "alice")
    cid = FakeCallerId()
    adm = Admission(registry, cid)
    req = request(timeout=2.0, deadline=time.monotonic() - 0.5)  # gave up 0.5 s ago
    with pytest.raises(Dropped) as e:
        adm.decide(req, PEER)
    assert e.value.tag == "expired"
    assert adopted_pids(registry, "42") == [set(), set()]
    assert "dropped, nothing done: the module's deadline passed" in caplog.text
    # Several jobs: not even the caller-ID call is made.
    registry.start("43", "alice")
    with pytest.raises(Dropped):
        adm.decide(req, PEER)
    assert cid.calls == []


def test_the_deadline_is_the_modules_own_clock(registry: JobRegistry) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = "A"
    adm = Admission(registry, cid, rpc_timeout=5.0)
    # The module started 0.5 s before the agent read its request (a busy machine): the
    # call gets what is left of its 60 % on the module's clock, not on the agent's.
    req = request(timeout=2.0, deadline=time.monotonic() + 2.0 - 0.5)
    assert adm.decide(req, PEER).job_id == "A"
    assert 0.6 < cid.calls[0][2] <= 2.0 * 0.6 - 0.5 + 1e-9
    # A deadline later than the module's timeout allows (not our clock) is bounded by it.
    req = dataclasses.replace(req, deadline=time.monotonic() + 1000)
    assert adm.decide(req, PEER).job_id == "A"
    assert cid.calls[1][2] <= 2.0 * 0.6 + 1e-9


def test_a_dead_caller_is_never_adopted(registry: JobRegistry,
                                        caplog: pytest.LogCaptureFixture) -> None:
    registry.start("42", "alice")
    child = subprocess.Popen(["/bin/true"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()  # exited and reaped: its pid is free for anyone
        with pytest.raises(Dropped) as e:
            Admission(registry, FakeCallerId()).decide(
                request(), Peer(child.pid, 0, 0, pidfd))
    finally:
        os.close(pidfd)
    assert e.value.tag == "caller-exited"
    assert adopted_pids(registry, "42") == [set(), set()]
    assert f"the asking process {child.pid} has exited" in caplog.text


def test_a_live_caller_is_adopted_through_its_pidfd(registry: JobRegistry) -> None:
    registry.start("42", "alice")
    pidfd = os.pidfd_open(os.getpid())
    try:
        r = Admission(registry, FakeCallerId()).decide(request(),
                                                       Peer(os.getpid(), 0, 0, pidfd))
    finally:
        os.close(pidfd)
    assert r.job_id == "42" and adopted_pids(registry, "42")[0] == {str(os.getpid())}


def ending(registry: JobRegistry, monkeypatch: pytest.MonkeyPatch, *ids: str) -> None:
    """The registry reports jobs `ids` as ending (their end has begun)."""
    real_list, real_get = registry.list_jobs, registry.get

    def mark(rec: JobRecord) -> JobRecord:
        return dataclasses.replace(rec, state="ending") if rec.job.id in ids else rec

    monkeypatch.setattr(registry, "list_jobs",
                        lambda user=None: [mark(r) for r in real_list(user)])
    monkeypatch.setattr(registry, "get",
                        lambda job_id: (lambda r: mark(r) if r else None)(real_get(job_id)))


def test_an_ending_job_attracts_no_login(registry: JobRegistry,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = "B"
    ending(registry, monkeypatch, "B")  # B, the newest, is ending
    adm = Admission(registry, cid)
    r = adm.decide(request(), PEER)
    # Only A is a candidate: one job, no call, and never B (caller ID or newest).
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "one-job", "A")
    assert cid.calls == [] and adopted_pids(registry, "B") == [set(), set()]
    ending(registry, monkeypatch, "A", "B")
    r = adm.decide(request(), Peer(99, 0, 0))
    assert (r.decision, r.reason) == (DENY, "no-jobs")


def test_a_job_that_starts_ending_during_the_decision_is_not_joined(
        registry: JobRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = two_jobs_of_alice(registry)
    cid.answer = "A"
    adm = Admission(registry, cid)
    real_call = cid.__call__

    def call_then_end(host: str, conn: Connection, deadline: float) -> str | None:
        answer = real_call(host, conn, deadline)
        ending(registry, monkeypatch, "A")  # `adoptctl job end A` while we asked
        return answer

    adm.caller_id = call_then_end
    r = adm.decide(request(), PEER)
    assert (r.decision, r.reason) == (DENY, "adopt-failed")
    assert "job A is ending" in r.detail
    assert adopted_pids(registry, "A") == [set(), set()]


@pytest.mark.root
def test_socket_drops_an_expired_request_without_answer(server: tuple[AdmissionServer, Path],
                                                        registry: JobRegistry,
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    registry.start("42", "alice")
    req = request(timeout=1.0, deadline=time.monotonic() - 1.8)  # as after a SIGSTOP
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server[1]))
        s.sendall(line_of(req))
        assert closed_without_answer(s)
    assert adopted_pids(registry, "42") == [set(), set()]
    assert "when the agent read it" in caplog.text
    # A request without a deadline (0: none) is answered, its timeout counted from now.
    assert ask(server[1], line_of(request())).job_id == "42"


class BlockingCallerId(FakeCallerId):
    """Holds every call until released (a slow or silent source agent); counts how many
    calls were in flight at once, per user (the user is the connection's source port)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.in_flight: collections.Counter[int] = collections.Counter()
        self.most: collections.Counter[int] = collections.Counter()
        self.started = threading.Semaphore(0)

    def __call__(self, host: str, conn: Connection, deadline: float) -> str | None:
        with self.lock:
            self.in_flight[conn.local.port] += 1
            self.most[conn.local.port] = max(self.most[conn.local.port],
                                           self.in_flight[conn.local.port])
        self.started.release()
        try:
            assert self.release.wait(30)
            return super().__call__(host, conn, deadline)
        finally:
            with self.lock:
                self.in_flight[conn.local.port] -= 1


@pytest.mark.root
def test_connection_closed_by_the_module_is_not_adopted(registry: JobRegistry, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    cid = BlockingCallerId()
    registry.start("A", "alice")
    registry.start("B", "alice")
    cid.answer = "A"
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, cid))
    srv.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(line_of(request()))
        assert cid.started.acquire(timeout=10)  # the agent is asking the source node
        s.close()  # the module gives up (its timeout)
        cid.release.set()
        wait_until(lambda: "closed the connection" in caplog.text)
    finally:
        srv.close()
    assert "before adopting into job A" in caplog.text
    assert adopted_pids(registry, "A") == [set(), set()]


DEAD_ASKER = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
asker = os.getpid()
if os.fork():
    os._exit(0)  # the process that asked (SO_PEERCRED) exits; its child keeps the socket
while os.getppid() == asker:
    time.sleep(0.001)
print(asker, flush=True)
s.sendall(sys.stdin.buffer.read())
s.settimeout(20)
print(repr(s.recv(4096)), flush=True)
"""


@pytest.mark.root
@pytest.mark.parametrize("from_socket", [True, False], ids=["SO_PEERPIDFD", "pidfd_open"])
def test_a_request_whose_caller_exited_is_not_adopted(registry: JobRegistry, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      from_socket: bool) -> None:
    # The connection stays open (a child holds it), but the process that asked is gone:
    # its pid, free now, must not be moved into the job. Kernels before 6.5 have no
    # SO_PEERPIDFD: then the pidfd is taken at accept.
    if from_socket and not admission_mod.peer_pidfd_works():
        pytest.skip("this kernel has no SO_PEERPIDFD")
    monkeypatch.setattr(admission_mod, "peer_pidfd_works", lambda: from_socket)
    registry.start("42", "alice")
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, FakeCallerId()))
    srv.start()
    try:
        p = subprocess.run([sys.executable, "-c", DEAD_ASKER, str(path)],
                           input=line_of(request()), capture_output=True, timeout=30)
    finally:
        srv.close()
    asker, answer = p.stdout.decode().split("\n")[:2]
    assert answer == "b''"  # closed without an answer
    assert adopted_pids(registry, "42") == [set(), set()]
    assert f"pid {asker}" in caplog.text and "exited" in caplog.text


def wait_until(cond: Callable[[], bool], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


# -- fairness --------------------------------------------------------------------------------

class Client(threading.Thread):
    """One module's request through the socket; .reply once answered (None: closed)."""

    def __init__(self, path: Path, req: Request) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.line = line_of(req)
        self.reply: Reply | None = None
        self.answered = threading.Event()

    def run(self) -> None:
        data = exchange(self.path, self.line, timeout=60)
        self.reply = decode_reply(data) if data else None
        self.answered.set()


@pytest.mark.root
def test_one_users_slow_logins_do_not_hold_up_another_users(registry: JobRegistry,
                                                            tmp_path: Path) -> None:
    # alice's logins all wait on a silent source node; bob's login needs a worker too.
    # With PER_USER + 2 workers and more of alice's requests than that, a pool without
    # per-user limits would be full of alice; here she holds PER_USER workers and bob is
    # answered at once.
    cid = BlockingCallerId()
    cid.answer = "A"
    registry.start("A", "alice")
    registry.start("B", "alice")
    registry.start("X", "bob")
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, cid), workers=PER_USER + 2)
    srv.start()
    try:
        alice = [Client(path, request("alice", "10.0.0.1 1 10.0.0.2 22", timeout=60))
                 for _ in range(PER_USER + 6)]
        for c in alice:
            c.start()
        for _ in range(PER_USER):
            assert cid.started.acquire(timeout=10)
        bob = Client(path, request("bob", "10.0.0.1 2 10.0.0.2 22", timeout=60))
        bob.start()
        assert bob.answered.wait(20), "bob waited behind alice's logins"
        assert bob.reply is not None and bob.reply.job_id == "X"
        # bob was answered while every one of alice's calls was still held.
        assert not any(c.answered.is_set() for c in alice)
        assert cid.in_flight[1] == PER_USER and len(cid.calls) == 0
        cid.release.set()
        for c in alice:
            assert c.answered.wait(30)
    finally:
        cid.release.set()
        srv.close()
    # Each of alice's requests waited its turn and was adopted into the right job.
    assert [c.reply and (c.reply.reason, c.reply.job_id) for c in alice] == \
        [("caller-id", "A")] * len(alice)
    assert cid.most[1] == PER_USER


def test_fair_pool_takes_users_in_turn() -> None:
    # A worker that frees up serves the next user in turn, not the oldest request: bob
    # and carol, arriving after alice's 6, each go before alice's 3rd.
    order: list[str] = []
    gate = threading.Event()
    done = threading.Semaphore(0)

    def handle(item: object) -> None:
        gate.wait(20)
        order.append(item.request.user)  # type: ignore[attr-defined]
        done.release()

    pool = FairPool(handle, workers=1, per_key=1, waiting_per_key=10)

    def item(user: str) -> object:
        conn = mock.Mock()
        conn.request = request(user)
        return conn

    for _ in range(6):
        assert pool.submit("alice", item("alice"))  # type: ignore[arg-type]
    assert pool.submit("bob", item("bob"))  # type: ignore[arg-type]
    assert pool.submit("carol", item("carol"))  # type: ignore[arg-type]
    pool.start()
    gate.set()
    for _ in range(8):
        assert done.acquire(timeout=20)
    pool.close()
    assert order == ["alice", "bob", "carol", "alice", "alice", "alice", "alice", "alice"]


@pytest.mark.root
def test_a_request_that_waited_past_its_deadline_is_dropped(
        registry: JobRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cid = BlockingCallerId()
    cid.answer = "A"
    registry.start("A", "alice")
    registry.start("B", "alice")
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, cid), per_user=1)
    srv.start()
    try:
        first = Client(path, request(timeout=60))
        first.start()
        assert cid.started.acquire(timeout=10)
        late = request(timeout=60, deadline=time.monotonic() + 0.2)  # gives up in 0.2 s
        second = Client(path, late)
        second.start()
        wait_until(lambda: time.monotonic() > late.deadline + 0.05)
        cid.release.set()
        assert first.answered.wait(20) and second.answered.wait(20)
    finally:
        cid.release.set()
        srv.close()
    assert first.reply is not None and first.reply.job_id == "A"
    assert second.reply is None  # dropped, not answered (nobody waits for it)
    assert len(cid.calls) == 1
    assert "deadline passed" in caplog.text and "before deciding" in caplog.text


@pytest.mark.root
def test_past_its_waiting_limit_a_users_login_is_refused_and_logged(
        registry: JobRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cid = BlockingCallerId()
    registry.start("A", "alice")
    registry.start("B", "alice")
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, cid), per_user=1, waiting_per_user=2)
    srv.start()
    try:
        held = [Client(path, request(timeout=60)) for _ in range(3)]
        held[0].start()
        assert cid.started.acquire(timeout=10)
        for c in held[1:]:
            c.start()
        wait_until(lambda: srv._pool.load("alice") == (1, 2))
        one_more = Client(path, request(timeout=60))
        one_more.start()
        assert one_more.answered.wait(20)
        assert one_more.reply is not None
        assert (one_more.reply.decision, one_more.reply.reason) == ("DENY", "busy")
        assert one_more.reply.message == MSG_BUSY
        assert "refused: 1 of alice's logins are being decided and 2 wait" in caplog.text
    finally:
        cid.release.set()
        srv.close()


@pytest.mark.root
def test_a_burst_of_one_users_logins_is_all_adopted(registry: JobRegistry,
                                                    tmp_path: Path) -> None:
    # 200 logins of one user at once (tests/benchmarks/bench_login_burst.py's size) are
    # not refused: each waits its turn and lands in its job.
    registry.start("A", "alice")
    registry.start("B", "alice")
    cid = FakeCallerId()
    cid.answer = "B"
    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), Admission(registry, cid))
    srv.start()
    try:
        clients = [Client(path, request(timeout=60)) for _ in range(200)]
        for c in clients:
            c.start()
        for c in clients:
            assert c.answered.wait(60)
    finally:
        srv.close()
    assert [c.reply and (c.reply.reason, c.reply.job_id) for c in clients] == \
        [("caller-id", "B")] * 200
