"""SockDiag's wire format against hand-built kernel answers (no kernel involved).

The live tests in test_callerid_live.py check the same code against the real kernel;
these pin down the bytes (include/uapi/linux/inet_diag.h) and the answer validation.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from callerid import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TCP_TIME_WAIT,
    Connection,
    DiagSocket,
    Endpoint,
    NetlinkUnavailable,
    SockDiag,
)

NLMSG_ERROR = 2
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_CGROUP_ID = 21

Reply = Callable[[bytes], bytes]  # request -> datagram


class FakeNetlink:
    """Stands in for the NETLINK_SOCK_DIAG socket: records requests, plays answers."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        reply = self.replies.pop(0)(self.sent[-1])
        buf[: len(reply)] = reply
        return len(reply)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_diag() -> Iterator[Callable[[list[Reply]], tuple[SockDiag, FakeNetlink]]]:
    made: list[SockDiag] = []

    def make(replies: list[Reply]) -> tuple[SockDiag, FakeNetlink]:
        try:
            diag = SockDiag()
        except NetlinkUnavailable:
            pytest.skip("no netlink here (the object is built with a real socket first)")
        diag._sock.close()  # type: ignore[union-attr]
        fake = FakeNetlink(replies)
        diag._sock = fake  # type: ignore[assignment]
        made.append(diag)
        return diag, fake

    yield make
    for d in made:
        d.close()


def seq_of(request: bytes) -> int:
    return int(struct.unpack_from("=I", request, 8)[0])


def nlmsg(mtype: int, seq: int, payload: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(payload), mtype, 0, seq, 4242) + payload
    return msg + b"\0" * (-len(msg) % 4)


def sockid(family: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """inet_diag_sockid (without if/cookie) as the kernel fills it for *family*."""

    def addr(ip: str) -> bytes:
        if family == socket.AF_INET:
            return socket.inet_pton(socket.AF_INET, ip) + bytes(12)
        if "." in ip and ":" not in ip:
            ip = "::ffff:" + ip
        return socket.inet_pton(socket.AF_INET6, ip)

    return struct.pack("!HH", local[1], remote[1]) + addr(local[0]) + addr(remote[0])


def rtattr(atype: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(payload), atype) + payload
    return attr + b"\0" * (-len(attr) % 4)


def answer(
    family: int,
    state: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    uid: int = 1000,
    inode: int = 777,
    cgroup_id: int | None = 4321,
    seq: int | None = None,
) -> Reply:
    def build(request: bytes) -> bytes:
        msg = struct.pack("=BBBB", family, state, 0, 0) + sockid(family, local, remote)
        msg += struct.pack("=I", 0) + b"\x11" * 8 + struct.pack("=IIIII", 0, 0, 0, uid, inode)
        # Attributes the kernel sends unasked (SHUTDOWN=8, SOCKOPT=22) around the cgroup id.
        msg += rtattr(8, b"\0")
        if cgroup_id is not None:
            msg += rtattr(INET_DIAG_CGROUP_ID, struct.pack("=Q", cgroup_id))
        msg += rtattr(22, b"\x12\x00")
        return nlmsg(SOCK_DIAG_BY_FAMILY, seq_of(request) if seq is None else seq, msg)

    return build


def error(err: int) -> Reply:
    def build(request: bytes) -> bytes:
        # struct nlmsgerr: int error; struct nlmsghdr msg (the request's header echoed).
        return nlmsg(NLMSG_ERROR, seq_of(request), struct.pack("=i", -err) + request[:16])

    return build


V4 = Connection(Endpoint.parse("10.0.0.1:40000"), Endpoint.parse("10.0.0.2:22"))
V6 = Connection(Endpoint.parse("[fd00::1]:40000"), Endpoint.parse("[fd00::2]:22"))
L4, R4 = ("10.0.0.1", 40000), ("10.0.0.2", 22)


def test_request_bytes(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, nl = fake_diag([error(errno.ENOENT), error(errno.ENOENT)])
    assert diag.lookup(V4) is None
    assert len(nl.sent) == 2  # AF_INET, then AF_INET6 with mapped addresses
    req = nl.sent[0]
    assert len(req) == 16 + 56
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, mtype, pid) == (72, SOCK_DIAG_BY_FAMILY, 0)
    assert flags == 0x1  # NLM_F_REQUEST only: no NLM_F_DUMP (0x300), an exact lookup
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad) == (socket.AF_INET, socket.IPPROTO_TCP, 0, 0)
    assert states == 0xFFFFFFFF
    # inet_diag_sockid: __be16 ports, __be32 src[4], dst[4], u32 if, u32 cookie[2].
    assert req[24:26] == b"\x9c\x40"  # 40000 big-endian
    assert req[26:28] == b"\x00\x16"  # 22
    assert req[28:44] == bytes([10, 0, 0, 1]) + bytes(12)
    assert req[44:60] == bytes([10, 0, 0, 2]) + bytes(12)
    assert req[60:64] == bytes(4)  # idiag_if = 0: any interface
    assert req[64:72] == b"\xff" * 8  # INET_DIAG_NOCOOKIE in both words
    mapped = nl.sent[1]
    assert mapped[16] == socket.AF_INET6
    assert mapped[28:44] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert mapped[44:60] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    assert seq_of(mapped) != seq_of(req)


def test_v6_request_asks_af_inet6_only(
    fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]],
) -> None:
    diag, nl = fake_diag([error(errno.ENOENT)])
    assert diag.lookup(V6) is None
    assert len(nl.sent) == 1
    assert nl.sent[0][16] == socket.AF_INET6
    assert nl.sent[0][28:44] == socket.inet_pton(socket.AF_INET6, "fd00::1")


def test_established_v4(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, _ = fake_diag([answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4)])
    assert diag.lookup(V4) == DiagSocket(
        V4.local, V4.remote, TCP_ESTABLISHED, 1000, 777, 4321, socket.AF_INET
    )


def test_dual_stack_answer_to_v4_question(
    fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]],
) -> None:
    # The kernel answers an AF_INET question with a dual-stack AF_INET6 socket whose
    # addresses are ::ffff:-mapped: that is a match.
    diag, _ = fake_diag([answer(socket.AF_INET6, TCP_ESTABLISHED, L4, R4)])
    found = diag.lookup(V4)
    assert found is not None and found.family == socket.AF_INET6
    assert found.local == V4.local and found.local.ip.version == 4


def test_mapped_fallback_after_enoent(
    fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]],
) -> None:
    diag, nl = fake_diag([error(errno.ENOENT), answer(socket.AF_INET6, TCP_ESTABLISHED, L4, R4)])
    found = diag.lookup(V4)
    assert found is not None and found.inode == 777
    assert [r[16] for r in nl.sent] == [socket.AF_INET, socket.AF_INET6]


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EAFNOSUPPORT])
def test_mapped_fallback_on_kernel_without_ipv6(
    fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]], err: int
) -> None:
    diag, _ = fake_diag([error(errno.ENOENT), error(err)])
    assert diag.lookup(V4) is None


def test_v6_answer(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, _ = fake_diag(
        [answer(socket.AF_INET6, TCP_ESTABLISHED, ("fd00::1", 40000), ("fd00::2", 22))]
    )
    found = diag.lookup(V6)
    assert found is not None and (found.local, found.remote) == (V6.local, V6.remote)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        # Exact lookups fall back to a listener: remote 0.0.0.0:0.
        (answer(socket.AF_INET, TCP_LISTEN, ("10.0.0.1", 40000), ("0.0.0.0", 0)), "LISTEN"),
        (answer(socket.AF_INET, TCP_LISTEN, L4, R4), "LISTEN"),
        # TIME_WAIT: uid 0, inode 0, no process holds it.
        (answer(socket.AF_INET, TCP_TIME_WAIT, L4, R4, uid=0, inode=0), "TIME_WAIT"),
        (answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4, inode=0), "inode 0"),
        # Addresses that are not the ones asked for.
        (answer(socket.AF_INET, TCP_ESTABLISHED, L4, ("10.0.0.3", 22)), "another socket"),
        (answer(socket.AF_INET, TCP_ESTABLISHED, L4, ("10.0.0.2", 23)), "another socket"),
        (answer(socket.AF_INET, TCP_ESTABLISHED, R4, L4), "another socket"),
        (answer(7, TCP_ESTABLISHED, L4, R4), "another socket"),
    ],
)
def test_answers_that_are_not_the_connection(
    fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]],
    caplog: pytest.LogCaptureFixture,
    reply: Reply,
    why: str,
) -> None:
    diag, _ = fake_diag([reply, error(errno.ENOENT)])
    with caplog.at_level(logging.DEBUG, logger="callerid"):
        assert diag.lookup(V4) is None
    assert why in caplog.text


def test_missing_cgroup_attribute(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    # Kernels before 5.9 or without CONFIG_SOCK_CGROUP_DATA send no INET_DIAG_CGROUP_ID.
    diag, _ = fake_diag([answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4, cgroup_id=None)])
    found = diag.lookup(V4)
    assert found is not None and found.cgroup_id is None


def test_large_cgroup_id(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, _ = fake_diag([answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4, cgroup_id=2**63 + 5)])
    found = diag.lookup(V4)
    assert found is not None and found.cgroup_id == 2**63 + 5


def test_stale_answer_is_skipped(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    # An answer left over from an interrupted earlier call carries another seq.
    stale = answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4, inode=1, seq=999_999)
    diag, _ = fake_diag([stale, answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4, inode=2)])
    found = diag.lookup(V4)
    assert found is not None and found.inode == 2


def test_other_kernel_errors_raise(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, _ = fake_diag([error(errno.EPERM)])
    with pytest.raises(OSError) as info:
        diag.lookup(V4)
    assert info.value.errno == errno.EPERM


def test_truncated_message_raises(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    def truncated(request: bytes) -> bytes:
        return answer(socket.AF_INET, TCP_ESTABLISHED, L4, R4)(request)[:60]

    diag, _ = fake_diag([truncated])
    with pytest.raises(OSError) as info:
        diag.lookup(V4)
    assert info.value.errno == errno.EPROTO


def test_short_inet_diag_msg_raises(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    def short(request: bytes) -> bytes:
        return nlmsg(SOCK_DIAG_BY_FAMILY, seq_of(request), bytes(40))

    diag, _ = fake_diag([short])
    with pytest.raises(OSError, match="short"):
        diag.lookup(V4)


def test_close_and_context_manager(fake_diag: Callable[..., tuple[SockDiag, FakeNetlink]]) -> None:
    diag, nl = fake_diag([])
    with diag as d:
        assert d is diag and not diag.closed
    assert diag.closed and nl.closed
    diag.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        diag.lookup(V4)


@pytest.mark.parametrize("err", [errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EPERM])
def test_netlink_unavailable(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(err, "nope")

    monkeypatch.setattr(socket, "socket", no_socket)
    with pytest.raises(NetlinkUnavailable, match="NETLINK_SOCK_DIAG"):
        SockDiag()
