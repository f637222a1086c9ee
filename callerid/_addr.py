"""IP addresses, TCP endpoints and connections, normalised once.

The kernel and its interfaces disagree on how an IPv4 peer of a dual-stack socket looks:
an AF_INET6 socket listening on ``[::]`` records a v4 client as ``::ffff:a.b.c.d``
(RFC 4291 section 2.5.5.2) in ``/proc/net/tcp6`` and in sock_diag answers, while the
client's own socket is plain AF_INET in ``/proc/net/tcp``. Slurm compares the raw forms and
misses these connections. Here every address is collapsed to IPv4 when it is IPv4-mapped,
at construction, so two :class:`Endpoint` objects compare equal whenever they name the same
peer, whichever table they came from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Self, TypeAlias

__all__ = ["Connection", "Endpoint", "IPAddress", "normalize_ip"]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_ip(ip: str | IPAddress) -> IPAddress:
    """Parse *ip* and collapse an IPv4-mapped IPv6 address to plain IPv4.

    Surrounding brackets (``[fd00::1]``) are accepted. A scope id (``fe80::1%eth0``) is
    rejected: TCP 4-tuples as the kernel reports them carry none.

    >>> normalize_ip("::ffff:10.0.0.1")
    IPv4Address('10.0.0.1')
    >>> normalize_ip("[fd00::1]")
    IPv6Address('fd00::1')

    Raises ValueError when *ip* is not an address.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if isinstance(ip, ipaddress.IPv6Address):
        addr: IPAddress = ip
    elif isinstance(ip, str):
        text = ip.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"not an IP address: {ip!r}") from None
    else:
        raise TypeError(f"expected an IP address or a string, got {type(ip).__name__}")
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError(f"scoped IPv6 addresses are not supported: {ip!r}")
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a TCP connection: an address (IPv4-mapped collapsed to IPv4) and a port.

    ``ip`` may be given as a string; it is normalised by ``__post_init__``.
    """

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        ip = normalize_ip(self.ip)
        if ip is not self.ip:
            # Frozen dataclass: normalising at construction is the whole point, so
            # bypass the frozen __setattr__ exactly once, here.
            object.__setattr__(self, "ip", ip)
        port = self.port
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"port must be an int, got {type(port).__name__}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range 0..65535: {port}")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``"10.0.0.1:22"``, ``"[fd00::1]:22"`` or ``"[::ffff:10.0.0.1]:22"``.

        An IPv6 address must be bracketed (``fd00::1:22`` is ambiguous). Raises ValueError
        with a message naming what is wrong.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        s = text.strip()
        if s.startswith("["):
            close = s.find("]")
            if close < 0 or s[close + 1 : close + 2] != ":":
                raise ValueError(f"bad endpoint {text!r}: expected [IPv6]:port")
            host, port_text = s[1:close], s[close + 2 :]
        else:
            host, sep, port_text = s.rpartition(":")
            if not sep or not host:
                raise ValueError(f"bad endpoint {text!r}: expected address:port")
            if ":" in host:
                raise ValueError(f"bad endpoint {text!r}: an IPv6 address needs brackets")
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(f"bad endpoint {text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"bad endpoint {text!r}: port out of range 0..65535")
        try:
            ip = normalize_ip(host)
        except ValueError:
            raise ValueError(f"bad endpoint {text!r}: {host!r} is not an IP address") from None
        return cls(ip, port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Connection:
    """A TCP connection as seen from THIS host: ``local`` is our end, ``remote`` the peer.

    This orientation is what both ``/proc/net/tcp`` (``local_address``/``rem_address``) and
    sock_diag (``idiag_src``/``idiag_dst``) use for the socket they describe.
    """

    local: Endpoint
    remote: Endpoint

    @classmethod
    def from_ssh_connection(cls, src: Endpoint, dst: Endpoint) -> Self:
        """Build the connection to look up on the SOURCE node from an ``SSH_CONNECTION``.

        This is the one place where source and destination are swapped (or rather, where
        it is decided that they are not):

        - sshd on the destination node sets ``SSH_CONNECTION="client_ip client_port
          server_ip server_port"``: *src* is the ssh client's end, *dst* sshd's end.
        - The caller-ID question is asked of the source node, where the ssh client runs.
          Seen from there, the client's socket is the local end and sshd the remote one,
          so ``local = src`` and ``remote = dst``.

        Anyone holding the destination-side view (sshd's own socket: local = dst) must not
        use this constructor for a lookup on the destination node.
        """
        return cls(local=src, remote=dst)

    def __str__(self) -> str:
        return f"{self.local} -> {self.remote}"
