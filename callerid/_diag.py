"""Exact TCP socket lookup by 4-tuple over ``NETLINK_SOCK_DIAG``, with the stdlib only.

One ``SOCK_DIAG_BY_FAMILY`` request without ``NLM_F_DUMP`` makes the kernel look the
socket up in its hash tables (net/ipv4/inet_diag.c ``inet_diag_find_one_icsk``) and answer
with one ``inet_diag_msg``: state, uid, inode and, unasked, ``INET_DIAG_CGROUP_ID`` (the
cgroup v2 id of the process that created the socket). That costs a few microseconds
whatever the number of sockets, where parsing ``/proc/net/tcp`` costs milliseconds and
pyroute2 can only dump. Unprivileged processes may ask.

Wire format (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h), host byte order
except where marked::

    struct nlmsghdr       { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }        16
    struct inet_diag_req_v2 {
        u8 sdiag_family, sdiag_protocol, idiag_ext, pad; u32 idiag_states;
        struct inet_diag_sockid id;                                                  }  56
    struct inet_diag_sockid {
        __be16 sport, dport; __be32 src[4], dst[4]; u32 if; u32 cookie[2];           }  48
    struct inet_diag_msg  {
        u8 family, state, timer, retrans; struct inet_diag_sockid id;
        u32 expires, rqueue, wqueue, uid, inode;                                     }  72
    followed by struct rtattr { u16 len; u16 type; } + payload, 4-byte aligned.

Addresses are 4 network-order words: an IPv4 address is ``src[0]`` with the rest zero.
In both request and answer, ``src``/``sport`` is the socket's own (local) end.

The netlink socket answers for the network namespace it was created in (the opener's).
"""

from __future__ import annotations

import enum
import errno
import logging
import select
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple, Self

from ._addr import Connection, Endpoint
from ._errors import NetlinkUnavailable
from ._procnet import TCP_LISTEN, TCP_STATE_NAMES, TCP_TIME_WAIT

__all__ = ["DiagSocket", "SockDiag"]

_log = logging.getLogger("callerid")

# include/uapi/linux/netlink.h
NETLINK_SOCK_DIAG: Final = 4  # == NETLINK_INET_DIAG
NLM_F_REQUEST: Final = 0x01
NLMSG_ERROR: Final = 0x02
NLMSG_DONE: Final = 0x03
# include/uapi/linux/sock_diag.h
SOCK_DIAG_BY_FAMILY: Final = 20
# include/uapi/linux/inet_diag.h
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF  # ~0U, in both cookie words: "any socket"
INET_DIAG_CGROUP_ID: Final = 21  # u64, since Linux 5.9 (CONFIG_SOCK_CGROUP_DATA)
_ALL_STATES: Final = 0xFFFFFFFF  # idiag_states; ignored by an exact lookup, set for clarity

_NLMSGHDR: Final = struct.Struct("=IHHII")
# nlmsghdr + inet_diag_req_v2 in one go. The 36-byte block is sport, dport (big-endian)
# and src[4], dst[4] (network order), built by _raw_id.
_REQUEST: Final = struct.Struct("=IHHII BBBBI 36s I II")
# inet_diag_msg: family, state, timer, retrans, sport+dport+src+dst (raw), if, cookie,
# expires, rqueue, wqueue, uid, inode.
_DIAG_MSG: Final = struct.Struct("=BBBB36sI8sIIIII")
_RTATTR: Final = struct.Struct("=HH")
_U64: Final = struct.Struct("=Q")
_ERRNO: Final = struct.Struct("=i")
_HDR_LEN: Final = _NLMSGHDR.size
_MSG_END: Final = _HDR_LEN + _DIAG_MSG.size
_RECV_BUF: Final = 8192  # one answer is ~130 bytes; an NLMSG_ERROR echoes our 72-byte request
_V4_PAD: Final = bytes(12)
_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"
_RECV_TIMEOUT_MS: Final = 1000

assert _REQUEST.size == _HDR_LEN + 56, "inet_diag_req_v2 must be 56 bytes"
assert _DIAG_MSG.size == 72, "inet_diag_msg must be 72 bytes"


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """A socket as sock_diag describes it.

    ``cgroup_id`` is None when the kernel sent no ``INET_DIAG_CGROUP_ID`` (older than 5.9 or
    built without socket cgroup data). ``family`` is the socket's own family: a v4
    connection served by a dual-stack socket answers ``AF_INET6``.
    """

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int
    cgroup_id: int | None
    family: int


class _Answer(NamedTuple):
    family: int
    state: int
    raw: bytes  # sport, dport, src[4], dst[4] as sent by the kernel
    uid: int
    inode: int
    cgroup_id: int | None


class _Stale(enum.Enum):
    NOT_OURS = enum.auto()  # a datagram without our sequence number


def _raw_id(local: Endpoint, remote: Endpoint, family: int) -> bytes:
    """The 36 address bytes of an inet_diag_sockid for this 4-tuple in *family*."""
    lp, rp = local.ip.packed, remote.ip.packed
    if family == socket.AF_INET:
        if len(lp) != 4 or len(rp) != 4:
            raise ValueError("an AF_INET lookup needs two IPv4 endpoints")
        src, dst = lp + _V4_PAD, rp + _V4_PAD
    else:
        # An IPv4 endpoint of a dual-stack AF_INET6 socket is ::ffff:a.b.c.d.
        src = lp if len(lp) == 16 else _MAPPED_PREFIX + lp
        dst = rp if len(rp) == 16 else _MAPPED_PREFIX + rp
    return local.port.to_bytes(2, "big") + remote.port.to_bytes(2, "big") + src + dst


class SockDiag:
    """A ``NETLINK_SOCK_DIAG`` socket for exact TCP lookups; reused for every lookup.

    Thread-safe (one lock around each request/answer pair). Use as a context manager or
    call :meth:`close`. Raises :class:`NetlinkUnavailable` if the socket cannot be made.
    """

    def __init__(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        except (OSError, AttributeError) as exc:
            # EPROTONOSUPPORT (no inet_diag), EAFNOSUPPORT (no netlink: gVisor, some
            # seccomp profiles), EPERM/EACCES (LSM): the /proc path still works.
            raise NetlinkUnavailable(f"cannot open a NETLINK_SOCK_DIAG socket: {exc}") from exc
        try:
            sock.bind((0, 0))  # port id 0: the kernel assigns a unique one
        except OSError as exc:
            sock.close()
            raise NetlinkUnavailable(f"cannot bind the NETLINK_SOCK_DIAG socket: {exc}") from exc
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()
        self._seq = 0
        self._req = bytearray(_REQUEST.size)
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the netlink socket (idempotent)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def lookup(self, conn: Connection) -> DiagSocket | None:
        """Find the established socket of *conn* (local = this host's end).

        Returns None when there is no such connection: the kernel answers ENOENT, or
        answers with a socket that is not this connection. The latter happens because
        the exact lookup falls back to a listener (``__inet_lookup`` tries the
        established hash, then the listening one), and a TIME_WAIT or request socket
        (inode 0: no process holds it) is no caller either.

        A v4 connection is asked as AF_INET first. The v4 lookup also finds a dual-stack
        AF_INET6 socket with ``::ffff:`` peers (the kernel hashes it by its v4 addresses),
        but if it answers ENOENT we still ask AF_INET6 with mapped addresses, which the
        kernel turns back into the same v4 lookup (``inet_diag_find_one_icsk``): cheap
        insurance against kernels that differ. Other errors raise OSError.
        """
        local, remote = conn.local, conn.remote
        if local.ip.version == 4 and remote.ip.version == 4:
            found = self._ask(socket.AF_INET, local, remote)
            if found is None:
                try:
                    found = self._ask(socket.AF_INET6, local, remote)
                except OSError as exc:
                    # A kernel without IPv6 cannot have a dual-stack socket either.
                    if exc.errno not in (errno.EINVAL, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                        raise
            return found
        return self._ask(socket.AF_INET6, local, remote)

    def _ask(self, family: int, local: Endpoint, remote: Endpoint) -> DiagSocket | None:
        raw = _raw_id(local, remote, family)
        with self._lock:
            sock = self._sock
            if sock is None:
                raise ValueError("lookup on a closed SockDiag")
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            # fmt: off
            _REQUEST.pack_into(
                self._req, 0,
                # nlmsghdr: no NLM_F_DUMP, so the kernel does one exact lookup
                _REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0,
                # inet_diag_req_v2: family, protocol, idiag_ext (nothing extra), pad, states
                family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES,
                # inet_diag_sockid: ports + addresses, idiag_if = 0 (any), cookie = ~0 ~0
                raw, 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE,
            )
            # fmt: on
            sock.send(self._req)
            while True:
                n = self._recv(sock)
                answer = self._parse(n, seq)
                if answer is not _Stale.NOT_OURS:
                    break
        if answer is None:
            return None
        r_family, state, r_raw, uid, inode, cgroup_id = answer
        # Only a real connection counts: an exact lookup may fall back to a LISTEN socket
        # (remote 0.0.0.0:0), and TIME_WAIT / request sockets have inode 0.
        if state == TCP_LISTEN or state == TCP_TIME_WAIT or inode == 0:
            _log.debug(
                "sock_diag: %s -> %s answered by a %s socket (inode %d): no connection",
                local,
                remote,
                TCP_STATE_NAMES.get(state, str(state)),
                inode,
            )
            return None
        # The answer's family may differ from the question's (dual-stack socket), so
        # compare with the rendering in the answer's family.
        if r_family not in (socket.AF_INET, socket.AF_INET6) or r_raw != _raw_id(
            local, remote, r_family
        ):
            _log.debug("sock_diag: %s -> %s answered by another socket: ignored", local, remote)
            return None
        return DiagSocket(local, remote, state, uid, inode, cgroup_id, r_family)

    def _recv(self, sock: socket.socket) -> int:
        # The kernel processes a netlink request synchronously inside send() (netlink_unicast
        # to a kernel socket calls sock_diag_rcv in our context), so the answer is already
        # queued: a non-blocking read avoids the poll() a socket timeout would add, and the
        # poll below only guards against the unexpected.
        try:
            return sock.recv_into(self._buf, _RECV_BUF, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(_RECV_TIMEOUT_MS):
            raise TimeoutError("no answer from NETLINK_SOCK_DIAG")
        return sock.recv_into(self._buf, _RECV_BUF)

    def _parse(self, n: int, seq: int) -> _Answer | None | _Stale:
        """Parse one datagram: a 6-tuple for our answer, None for "no such socket",
        _Stale.NOT_OURS when it held nothing for *seq* (a stale answer of an interrupted call)."""
        buf = self._view
        off = 0
        while off + _HDR_LEN <= n:
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
            if length < _HDR_LEN or off + length > n:
                raise OSError(errno.EPROTO, f"truncated netlink message ({length} bytes)")
            if mseq == seq:
                if mtype == NLMSG_ERROR:
                    (err,) = _ERRNO.unpack_from(buf, off + _HDR_LEN)
                    if err == 0:
                        pass  # an ACK; we did not ask for one, keep reading
                    elif -err == errno.ENOENT:
                        return None
                    else:
                        raise OSError(-err, f"sock_diag: {errno.errorcode.get(-err, -err)}")
                elif mtype == SOCK_DIAG_BY_FAMILY:
                    if length < _DIAG_MSG.size + _HDR_LEN:
                        raise OSError(errno.EPROTO, "short inet_diag_msg")
                    family, state, _t, _r, raw, _if, _ck, _e, _rq, _wq, uid, inode = (
                        _DIAG_MSG.unpack_from(buf, off + _HDR_LEN)
                    )
                    cgroup_id = _cgroup_id(buf, off, length)
                    return _Answer(family, state, bytes(raw), uid, inode, cgroup_id)
                elif mtype == NLMSG_DONE:
                    return None
            off += (length + 3) & ~3
        return _Stale.NOT_OURS


def _cgroup_id(buf: memoryview, off: int, length: int) -> int | None:
    """Find INET_DIAG_CGROUP_ID among the rtattrs that follow the inet_diag_msg."""
    pos = off + _MSG_END
    end = off + length
    while pos + 4 <= end:
        alen, atype = _RTATTR.unpack_from(buf, pos)
        if alen < 4:
            break
        # NLA_F_NESTED / NLA_F_NET_BYTEORDER live in the top bits of the type.
        if atype & 0x3FFF == INET_DIAG_CGROUP_ID and alen >= 12:
            return int(_U64.unpack_from(buf, pos + 4)[0])
        pos += (alen + 3) & ~3
    return None
