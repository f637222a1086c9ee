"""The job's namespaces handed to pam_adopt with the admission reply (SCM_RIGHTS).

The agent's side: which replies carry fds (an adopting one, when the request asks with
join_container=true; never another, never to a peer that is not root), that the fds and
`namespaces=` go in one message, and that the agent keeps none of them open afterwards,
whatever happened to the reply. The fds are real: the test process's own
/proc/self/ns/* (a FakeBackend opens them as a job's namespaces).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent import pamcontract
from node_agent.agent.admission import Admission, AdmissionServer, Peer
from node_agent.pamcontract import MSG_ADOPT_FAILED, MSG_NO_JOBS, Reply, Request
from tests.unit.fakes import FakeBackend

PEER = Peer(pid=4321, uid=0, gid=0)
JOB_NS = [("mnt", "/proc/self/ns/mnt"), ("net", "/proc/self/ns/net")]


def no_caller_id(host: str, conn: object, deadline: float) -> str | None:
    return None


def request(**fields: str | float) -> Request:
    base: dict[str, str | float] = {"user": "alice", "service": "sshd", "timeout": 5.0,
                                    "ssh_connection": "10.0.0.1 40000 10.0.0.2 22"}
    return Request(**{**base, **fields})  # type: ignore[arg-type]


def ns_fds_open() -> list[int]:
    """This process's fds open on a namespace (nsfs: "mnt:[4026531841]")."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.split(":", 1)[0] in ("mnt", "net") and target.endswith("]"):
            out.append(int(name))
    return out


def agent_closed_its_copies(expected: list[int] | None = None) -> bool:
    """Whether only `expected` (the fds received) stay open on a namespace in this
    process, where the agent runs: it closes its own copies just after the reply (or its
    failure), so give it a moment."""
    deadline = time.monotonic() + 10
    while sorted(ns_fds_open()) != sorted(expected or []):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def ns_id(path_or_fd: str | int) -> tuple[int, int]:
    st = os.stat(path_or_fd) if isinstance(path_or_fd, str) else os.fstat(path_or_fd)
    return st.st_dev, st.st_ino


@pytest.fixture
def jobs() -> FakeBackend:
    b = FakeBackend(node="n2")
    b.add("42", "alice", 1001, pids=[os.getpid()])
    b.ns["42"] = list(JOB_NS)
    return b


# -- Admission.decide ------------------------------------------------------------------------

def test_an_adopting_reply_names_the_fds_it_hands_over(jobs: FakeBackend) -> None:
    fds: list[int] = []
    reply = Admission(jobs, no_caller_id).decide(request(join_container="true"), PEER,
                                                namespaces=fds)
    try:
        assert (reply.decision, reply.job_id, reply.namespaces) == ("ALLOW", "42",
                                                                    ("mnt", "net"))
        assert [ns_id(fd) for fd in fds] == [ns_id(p) for _, p in JOB_NS]
        assert "namespaces mnt,net" in reply.detail
        assert jobs.adopted == [("42", PEER.pid)]   # adopted first, then the namespaces
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("join", ["false", "", "TRUE", "yes"])
def test_namespaces_only_when_the_module_asks_for_them(jobs: FakeBackend, join: str) -> None:
    # The module always sends join_container; a request without it (typed by hand, or
    # anything but "true") gets no fd, and the backend is not even asked.
    fds: list[int] = []
    reply = Admission(jobs, no_caller_id).decide(request(join_container=join), PEER,
                                                namespaces=fds)
    assert (reply.decision, reply.namespaces, fds, jobs.ns_opened) == ("ALLOW", (), [], [])


def test_non_adopting_replies_fetch_no_namespaces(jobs: FakeBackend) -> None:
    adm = Admission(jobs, no_caller_id)
    fds: list[int] = []
    r = adm.decide(request(user="bob", join_container="true"), PEER, namespaces=fds)
    assert (r.decision, r.message, r.namespaces) == ("DENY", MSG_NO_JOBS, ())
    # Two jobs, the source knows nothing, action_unknown=allow: admitted, in no job.
    jobs.add("43", "alice", 1001)
    r = adm.decide(request(join_container="true", action_unknown="allow"), PEER,
                   namespaces=fds)
    assert (r.decision, r.reason, r.job_id, r.namespaces) == ("ALLOW", "unknown-allow", "",
                                                              ())
    jobs.adopt_error = OSError("cgroup gone")
    r = adm.decide(request(join_container="true"), PEER, namespaces=fds)
    assert (r.decision, r.reason) == ("DENY", "adopt-failed")
    assert fds == [] and jobs.ns_opened == []


@pytest.mark.parametrize("action, decision, reason", [
    ("deny", "DENY", "join-failed"), ("allow", "ALLOW", "join-failed-allow")])
def test_namespaces_that_cannot_be_had_are_an_adoption_failure(
        jobs: FakeBackend, action: str, decision: str, reason: str) -> None:
    # pam_slurm_adopt: "stepd_get_ns_fd failed" -> action_adopt_failure.
    jobs.ns_error = ProcessLookupError("job 42: its process went away")
    fds: list[int] = []
    r = Admission(jobs, no_caller_id).decide(
        request(join_container="true", action_adopt_failure=action), PEER, namespaces=fds)
    assert (r.decision, r.reason, r.namespaces, fds) == (decision, reason, (), [])
    assert "its process went away" in r.detail
    if decision == "DENY":
        assert r.message == MSG_ADOPT_FAILED and not r.job_id
    else:
        assert r.job_id == "42" and r.env   # adopted: in the job's cgroups all the same


def test_another_node_is_refused_before_anything(jobs: FakeBackend,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    adm = Admission(jobs, no_caller_id)
    r = adm.decide(request(nodename="node7", join_container="true"), PEER, namespaces=[])
    assert (r.decision, r.reason, r.message) == ("DENY", "wrong-node",
                                                 pamcontract.MSG_BAD_REQUEST)
    assert "nodename=node7 is not this agent's node n2" in caplog.text
    assert jobs.adopted == [] and jobs.ns_opened == []
    r = adm.decide(request(nodename="n2"), PEER)
    assert (r.decision, r.job_id) == ("ALLOW", "42")


# -- the socket ------------------------------------------------------------------------------

def recv_reply(s: socket.socket) -> tuple[bytes, list[int], int]:
    """The whole reply, the fds that came with it, and how many reads had fds."""
    data, fds, reads_with_fds = b"", [], 0
    while True:
        chunk, anc, flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(16 * 4),
                                         socket.MSG_CMSG_CLOEXEC)
        assert not flags & socket.MSG_CTRUNC
        got = [fd for level, kind, payload in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in struct.unpack(f"{len(payload) // 4}i", payload)]
        if got:
            reads_with_fds += 1
            assert data == b"", "the fds came with the reply's first byte"
        fds += got
        if not chunk:
            return data, fds, reads_with_fds
        data += chunk


@pytest.fixture
def server(jobs: FakeBackend) -> Iterator[tuple[AdmissionServer, Path]]:
    d = Path(tempfile.mkdtemp(prefix="admission-ns-test-"))  # nobody must reach it
    d.chmod(0o755)
    path = d / "admission.sock"
    srv = AdmissionServer(str(path), Admission(jobs, no_caller_id))
    srv.start()
    try:
        yield srv, path
    finally:
        srv.close()
        shutil.rmtree(d)


def exchange(path: Path, req: Request) -> tuple[Reply, list[int], int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(pamcontract.encode_request(req))
        data, fds, reads = recv_reply(s)
    return pamcontract.decode_reply(data), fds, reads


@pytest.mark.root
def test_the_fds_travel_with_the_reply_and_the_agent_keeps_none(
        server: tuple[AdmissionServer, Path], jobs: FakeBackend) -> None:
    assert agent_closed_its_copies()
    reply, fds, reads = exchange(server[1], request(join_container="true"))
    try:
        assert (reply.decision, reply.namespaces, reads) == ("ALLOW", ("mnt", "net"), 1)
        assert [ns_id(fd) for fd in fds] == [ns_id(p) for _, p in JOB_NS]
        assert all(not os.get_inheritable(fd) for fd in fds)
        assert len(jobs.ns_opened) == 2
        assert agent_closed_its_copies(fds)
    finally:
        for fd in fds:
            os.close(fd)
    reply, fds, _ = exchange(server[1], request(join_container="false"))
    assert (reply.decision, reply.namespaces, fds) == ("ALLOW", (), [])
    assert agent_closed_its_copies()


@pytest.mark.root
def test_no_fd_leaks_when_the_reply_cannot_be_sent(
        server: tuple[AdmissionServer, Path], jobs: FakeBackend,
        caplog: pytest.LogCaptureFixture) -> None:
    # The module gives up between the adoption and the reply: the sendmsg fails (EPIPE),
    # and the agent closes the fds all the same.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    real_namespaces = jobs.namespaces

    def namespaces_then_hang_up(job_id: str) -> list[tuple[str, int]]:
        got = real_namespaces(job_id)
        client.close()
        return got

    jobs.namespaces = namespaces_then_hang_up  # type: ignore[method-assign]
    client.settimeout(10)
    client.connect(str(server[1]))
    client.sendall(pamcontract.encode_request(request(join_container="true")))
    deadline = time.monotonic() + 10
    while "connection dropped before the answer" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert len(jobs.ns_opened) == 2
    assert agent_closed_its_copies()


@pytest.mark.root
def test_no_fd_leaks_when_the_decision_fails_after_fetching_them(
        jobs: FakeBackend, tmp_path: Path) -> None:
    class FailsLate(Admission):
        def decide(self, request: Request, peer: Peer, received: float | None = None,
                   hung_up: object = None, namespaces: list[int] | None = None) -> Reply:
            super().decide(request, peer, received, namespaces=namespaces)
            assert namespaces, "the fds were fetched"
            raise RuntimeError("a bug after the fds were fetched")

    path = tmp_path / "admission.sock"
    srv = AdmissionServer(str(path), FailsLate(jobs, no_caller_id))
    srv.start()
    try:
        reply, fds, _ = exchange(path, request(join_container="true"))
    finally:
        srv.close()
    assert (reply.decision, reply.reason, reply.namespaces, fds) == (
        "DENY", "internal-error", (), [])
    assert len(jobs.ns_opened) == 2 and agent_closed_its_copies()


AS_NOBODY = """
import os, socket, struct, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # before connecting: SO_PEERCRED is what the peer was at connect()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
data, fds = b"", 0
while True:
    chunk, anc, flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(64))
    fds += sum(len(p) // 4 for level, kind, p in anc if kind == socket.SCM_RIGHTS)
    if not chunk:
        break
    data += chunk
print(fds, flush=True)
sys.stdout.buffer.write(data)
"""


@pytest.mark.root
def test_a_peer_that_is_not_root_never_gets_a_namespace_fd(
        server: tuple[AdmissionServer, Path], jobs: FakeBackend) -> None:
    """Namespace fds of another user's job would be a way into its mounts: the socket is
    0600, and even opened up (so that only the SO_PEERCRED check stands in the way) a
    process of uid 65534 asking for them gets a refusal and no fd, and the backend is
    not asked for any."""
    srv, path = server
    path.chmod(0o666)
    line = pamcontract.encode_request(request(join_container="true"))
    child = subprocess.run([sys.executable, "-I", "-c", AS_NOBODY, str(path)], input=line,
                           capture_output=True, timeout=20)
    assert child.returncode == 0, child.stderr.decode()
    count, _, data = child.stdout.partition(b"\n")
    reply = pamcontract.decode_reply(data)
    assert (int(count), reply.decision, reply.reason, reply.namespaces) == (
        0, "DENY", "not-root", ())
    assert jobs.adopted == [] and jobs.ns_opened == []
    # The same request from root (this process) is answered with them.
    reply, fds, _ = exchange(path, request(join_container="true"))
    for fd in fds:
        os.close(fd)
    assert (reply.namespaces, len(fds)) == (("mnt", "net"), 2)


def test_a_reply_never_carries_fds_it_does_not_name(server: tuple[AdmissionServer, Path],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # _finish's guard: fds with a reply that does not name them (a bug) are not sent.
    srv, _ = server
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        conn = type("C", (), {"sock": a, "peer": PEER, "close": lambda self: a.close()})()
        srv._finish(conn, Reply("DENY", reason="no-jobs"), [r])
        data, fds, _ = recv_reply(b)
        assert fds == [] and pamcontract.decode_reply(data).decision == "DENY"
        assert "1 namespace fds for a DENY reply naming none: sent without them" in \
            caplog.text
    finally:
        b.close()
        os.close(r)
        os.close(w)
