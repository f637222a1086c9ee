"""The IP addresses of this network namespace, over ``NETLINK_ROUTE``, with the stdlib only.

The node agent uses them to tell whether a credential was minted for *this* node: a
client names the address it dialed, and an agent accepts only its own addresses. One
``RTM_GETADDR`` dump asks the kernel for every address of every interface (what
``ip -o addr`` prints) in the opener's network namespace.

Wire format (include/uapi/linux/netlink.h, rtnetlink.h, if_addr.h), host byte order::

    struct nlmsghdr  { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }     16
    struct ifaddrmsg { u8 family, prefixlen, flags, scope; u32 index; }        8
    followed by struct rtattr { u16 len; u16 type; } + payload, 4-byte aligned.

``IFA_LOCAL`` is the interface's own address where it differs from ``IFA_ADDRESS`` (the
peer's, on point-to-point links); elsewhere only ``IFA_ADDRESS`` is sent and is the
local one.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Final

from ._addr import IPAddress, normalize_ip
from ._errors import NetlinkUnavailable

__all__ = ["local_addresses"]

# include/uapi/linux/netlink.h, rtnetlink.h, if_addr.h
NLM_F_REQUEST: Final = 0x01
NLM_F_DUMP: Final = 0x300
NLMSG_ERROR: Final = 0x02
NLMSG_DONE: Final = 0x03
RTM_NEWADDR: Final = 20
RTM_GETADDR: Final = 22
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2

_NLMSGHDR: Final = struct.Struct("=IHHII")
_IFADDRMSG: Final = struct.Struct("=BBBBI")
_RTATTR: Final = struct.Struct("=HH")
_ERRNO: Final = struct.Struct("=i")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addr_messages(data: bytes) -> tuple[list[IPAddress], bool]:
    """The addresses in a chunk of ``RTM_NEWADDR`` messages, and whether the dump ended
    (``NLMSG_DONE``). Raises OSError for an ``NLMSG_ERROR`` with an error code."""
    out: list[IPAddress] = []
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > len(data):
            break  # truncated: the kernel never sends that; stop rather than misread
        body = at + _NLMSGHDR.size
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            (err,) = _ERRNO.unpack_from(data, body)
            if err:
                raise OSError(-err, f"RTM_GETADDR: {errno.errorcode.get(-err, err)}")
        elif kind == RTM_NEWADDR and length >= _NLMSGHDR.size + _IFADDRMSG.size:
            family = data[body]
            attrs: dict[int, bytes] = {}
            pos = body + _IFADDRMSG.size
            while pos + _RTATTR.size <= at + length:
                alen, atype = _RTATTR.unpack_from(data, pos)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = data[pos + _RTATTR.size:pos + alen]
                pos += _align(alen)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if family == socket.AF_INET and raw is not None and len(raw) == 4:
                out.append(ipaddress.IPv4Address(raw))
            elif family == socket.AF_INET6 and raw is not None and len(raw) == 16:
                out.append(normalize_ip(ipaddress.IPv6Address(raw)))
        at += _align(length)
    return out, False


def local_addresses() -> frozenset[IPAddress]:
    """Every IPv4 and IPv6 address of this network namespace (IPv4-mapped forms are
    normalised by the caller's comparisons, see :func:`normalize_ip`)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
    except OSError as e:
        raise NetlinkUnavailable(f"cannot open a NETLINK_ROUTE socket: {e}") from None
    with sock:
        sock.settimeout(2.0)
        request = (_NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR,
                                  NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                   + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
        sock.sendall(request)
        found: list[IPAddress] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            addrs, done = parse_addr_messages(chunk)
            found += addrs
            if done:
                break
    return frozenset(found)
