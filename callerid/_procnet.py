"""Readers for ``/proc/net/tcp`` and ``/proc/net/tcp6``: the Slurm-equivalent socket table.

This is the slow, universally available path (a full table parse, 8-28 ms for 2k-19k
sockets here) that the netlink lookup in :mod:`callerid._diag` replaces, kept as the
fallback and as the reference the tests cross-check against.

Format (net/ipv4/tcp_ipv4.c ``get_tcp4_sock``, net/ipv6/tcp_ipv6.c ``get_tcp6_sock``)::

    sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
     0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17385

The whitespace-separated fields used here are 1 (local), 2 (remote), 3 (state, hex),
7 (uid, decimal, in the reader's user namespace) and 9 (inode, decimal; 0 for TIME_WAIT
and request sockets, which belong to no file). Each file shows the network namespace of
the process named in ``/proc/<pid>/net/``; ``/proc/self/net`` is the reader's own.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._addr import Connection, Endpoint
from ._errors import KernelFormatError

__all__ = [
    "TCP_CLOSE",
    "TCP_CLOSE_WAIT",
    "TCP_CLOSING",
    "TCP_ESTABLISHED",
    "TCP_FIN_WAIT1",
    "TCP_FIN_WAIT2",
    "TCP_LAST_ACK",
    "TCP_LISTEN",
    "TCP_NEW_SYN_RECV",
    "TCP_STATE_NAMES",
    "TCP_SYN_RECV",
    "TCP_SYN_SENT",
    "TCP_TIME_WAIT",
    "TcpSocket",
    "decode_address",
    "find_in_tables",
    "parse_tcp_table",
    "read_tcp_tables",
]

# include/net/tcp_states.h: the values printed in the "st" column and carried in
# inet_diag_msg.idiag_state.
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12

TCP_STATE_NAMES: dict[int, str] = {
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_SYN_SENT: "SYN_SENT",
    TCP_SYN_RECV: "SYN_RECV",
    TCP_FIN_WAIT1: "FIN_WAIT1",
    TCP_FIN_WAIT2: "FIN_WAIT2",
    TCP_TIME_WAIT: "TIME_WAIT",
    TCP_CLOSE: "CLOSE",
    TCP_CLOSE_WAIT: "CLOSE_WAIT",
    TCP_LAST_ACK: "LAST_ACK",
    TCP_LISTEN: "LISTEN",
    TCP_CLOSING: "CLOSING",
    TCP_NEW_SYN_RECV: "NEW_SYN_RECV",
}

ByteOrder = Literal["little", "big"]
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One row of ``/proc/net/tcp{,6}``; addresses are normalised (mapped -> IPv4)."""

    local: Endpoint
    remote: Endpoint
    state: int
    uid: int
    inode: int


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in _HEXDIGITS for c in text)


def decode_address(field: str, *, byteorder: ByteOrder = sys.byteorder) -> Endpoint:
    """Decode one ``ADDRESS:PORT`` field of ``/proc/net/tcp`` or ``/proc/net/tcp6``.

    The kernel prints each 32-bit word of the address with ``%08X`` after reading it as a
    native integer, although the word holds bytes in network order (``__be32``). On a
    little-endian host every word therefore comes out byte-reversed; the port is a plain
    host-order ``%04X``. IPv6 addresses are four such words, each reversed on its own.

    Worked example (little-endian, as on x86)::

        "0100007F:0016"
         0100007F -> bytes 01 00 00 7F -> reversed 7F 00 00 01 -> 127.0.0.1
         0016     -> 22
         => 127.0.0.1:22

        "0000000000000000FFFF00000100007F:0016"
         words 00000000 00000000 FFFF0000 0100007F, each reversed:
         00000000 00000000 0000FFFF 7F000001 -> ::ffff:127.0.0.1 -> 127.0.0.1:22

    >>> str(decode_address("0100007F:0016"))
    '127.0.0.1:22'

    *byteorder* is the byte order of the host that produced the text (this host's by
    default). IPv4-mapped IPv6 results are collapsed to IPv4 by :class:`Endpoint`.
    Raises ValueError on anything that is not 8 or 32 hex digits, a colon and 4 hex digits.
    """
    addr_hex, sep, port_hex = field.partition(":")
    if not sep or len(port_hex) != 4 or not _is_hex(port_hex):
        raise ValueError(f"bad address field {field!r}: expected HEXADDR:HHHH")
    if len(addr_hex) not in (8, 32) or not _is_hex(addr_hex):
        raise ValueError(f"bad address field {field!r}: address must be 8 or 32 hex digits")
    packed = b"".join(
        int(addr_hex[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(addr_hex), 8)
    )
    ip = ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)
    return Endpoint(ip, int(port_hex, 16))


def _encode_ip(packed: bytes, byteorder: ByteOrder = sys.byteorder) -> str:
    """The inverse of the address half of :func:`decode_address` (packed bytes -> hex)."""
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], byteorder):08X}" for i in range(0, len(packed), 4)
    )


def _encode_endpoint(ep: Endpoint, v6: bool, byteorder: ByteOrder = sys.byteorder) -> str:
    """*ep* as the kernel would print it in ``tcp`` (v6=False) or ``tcp6`` (v6=True).

    A v4 endpoint printed in tcp6 is the IPv4-mapped form a dual-stack socket shows.
    """
    ip = ep.ip
    if v6 and ip.version == 4:
        packed = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
    else:
        packed = ip.packed
    return f"{_encode_ip(packed, byteorder)}:{ep.port:04X}"


def _parse_line(path: str, lineno: int, line: str) -> TcpSocket:
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":"):
        raise KernelFormatError(path, lineno, line, "expected at least 10 fields")
    try:
        local = decode_address(fields[1])
        remote = decode_address(fields[2])
        if len(fields[3]) != 2:
            raise ValueError(f"bad state {fields[3]!r}")
        state = int(fields[3], 16)
        uid = int(fields[7])
        inode = int(fields[9])
    except ValueError as exc:
        raise KernelFormatError(path, lineno, line, str(exc)) from None
    if uid < 0 or inode < 0:
        raise KernelFormatError(path, lineno, line, "negative uid or inode")
    return TcpSocket(local, remote, state, uid, inode)


def parse_tcp_table(path: str | os.PathLike[str]) -> Iterator[TcpSocket]:
    """Yield every socket of one ``/proc/net/tcp`` or ``tcp6`` file.

    The header line is skipped. A malformed line raises :class:`KernelFormatError` naming
    the file, line number and text. The kernel generates the file while we read it, so a
    socket may appear twice or not at all if the table changes under us (seq_file reads
    one chunk at a time): callers must not treat the result as a snapshot.
    """
    name = os.fspath(path)
    with open(name, encoding="ascii", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                if not line.lstrip().startswith("sl"):
                    raise KernelFormatError(name, lineno, line, "missing header")
                continue
            if not line.strip():
                continue
            yield _parse_line(name, lineno, line)


def _table_paths(procfs: str | os.PathLike[str], pid: int | str) -> tuple[Path, Path]:
    base = Path(procfs) / str(pid) / "net"
    return base / "tcp", base / "tcp6"


def read_tcp_tables(
    procfs: str | os.PathLike[str] = "/proc", pid: int | str = "self"
) -> list[TcpSocket]:
    """Every TCP socket of ``<procfs>/<pid>/net/tcp`` and ``tcp6``.

    A missing ``tcp6`` is normal (IPv6 disabled at boot: ``ipv6.disable=1``); a missing
    ``tcp`` is not, and raises FileNotFoundError (also what a *pid* that has exited gives).
    """
    tcp, tcp6 = _table_paths(procfs, pid)
    result = list(parse_tcp_table(tcp))
    try:
        result.extend(parse_tcp_table(tcp6))
    except FileNotFoundError:
        pass
    return result


def find_in_tables(
    conn: Connection, procfs: str | os.PathLike[str] = "/proc", pid: int | str = "self"
) -> TcpSocket | None:
    """Find the socket of *conn* in ``<procfs>/<pid>/net/tcp{,6}``, the way Slurm does,
    but with IPv4-mapped addresses handled.

    Only a socket that belongs to a file counts: LISTEN sockets (which match no 4-tuple),
    and TIME_WAIT and request sockets (inode 0, nothing holds them) are ignored.

    Both tables are searched: a v4 connection can be a plain AF_INET socket in ``tcp`` or
    a dual-stack AF_INET6 socket, printed with ``::ffff:``-mapped addresses, in ``tcp6``.
    To keep a full scan cheap, a line is fully decoded only when its raw address fields
    already equal the kernel's rendering of *conn* (uppercase hex, see
    :func:`decode_address`); lines with too few fields still raise KernelFormatError.
    """
    tcp, tcp6 = _table_paths(procfs, pid)
    wanted: list[tuple[Path, str, str]] = []
    if conn.local.ip.version == 4 and conn.remote.ip.version == 4:
        v4 = (tcp, _encode_endpoint(conn.local, False), _encode_endpoint(conn.remote, False))
        wanted.append(v4)
    v6 = (tcp6, _encode_endpoint(conn.local, True), _encode_endpoint(conn.remote, True))
    wanted.append(v6)
    for path, want_local, want_remote in wanted:
        name = os.fspath(path)
        try:
            f = open(name, encoding="ascii", errors="surrogateescape")
        except FileNotFoundError:
            if path is tcp6:
                continue  # IPv6 disabled: no tcp6 table.
            raise
        with f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1:
                    continue
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 10:
                    raise KernelFormatError(name, lineno, line, "expected at least 10 fields")
                if fields[1].upper() != want_local or fields[2].upper() != want_remote:
                    continue
                sock = _parse_line(name, lineno, line)
                if sock.state in (TCP_LISTEN, TCP_TIME_WAIT) or sock.inode == 0:
                    continue
                # Decoding is the authority; the raw comparison only pre-filters.
                if sock.local == conn.local and sock.remote == conn.remote:
                    return sock
    return None
