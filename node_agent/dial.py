"""Reaching an agent: the one place that turns a node name or a target into a channel.

Every client of an agent — the CLIs, and an agent asking another for caller ID — gets
its channel here, so that a new way to reach nodes (a broker for nodes that accept no
inbound connections) is added here and nowhere else.

Targets are "unix:/path" (this node's agent), an IP literal with a port, or a host name
that is resolved here with the system resolver (/etc/hosts first), so that gRPC never
does a DNS lookup of its own. Every channel carries a MUNGE credential per call and
checks the agent's (node_agent.auth.CredentialPlugin), and sends keepalive pings so that
a dead agent ends a long stream (an ssh-to-job session) within seconds.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol

import grpc

from node_agent.auth import Authenticator, CredentialPlugin


class AgentAddressing(Protocol):
    """What dialing needs from the configuration (node_agent.config.AgentConfig)."""

    @property
    def port(self) -> int:
        """The agents' TCP port."""
        ...

    @property
    def socket(self) -> str:
        """This node's agent's Unix socket."""
        ...


def grpc_target(host: str, port: int) -> str:
    """An explicit ipv4:/ipv6: target for a host name or IP literal (no DNS from gRPC).

    >>> grpc_target("10.0.0.5", 411), grpc_target("[fe80::1]", 411)
    ('ipv4:10.0.0.5:411', 'ipv6:[fe80::1]:411')
    """
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve node name {host!r}: {e.strerror}") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    if ip.version == 6:
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{ip}:{port}"


def target_of(spec: str, default_port: int) -> str:
    """'unix:/p', 'HOST', 'HOST:PORT', '[v6]:PORT' or 'v6' -> a gRPC target."""
    if spec.startswith("unix:"):
        return spec
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return grpc_target(host, int(rest[1:]) if rest.startswith(":") else default_port)
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return grpc_target(host, int(port))
    return grpc_target(spec, default_port)


def agent_target(cfg: AgentAddressing, node: str | None = None) -> str:
    """The target of `node`'s agent (a name, an address, "HOST:PORT" or "unix:/path"),
    or of this node's own agent (its Unix socket) when `node` is None or empty."""
    return target_of(node, cfg.port) if node else f"unix:{cfg.socket}"


# Keepalive: a ping every 5 s while a call is open, the connection declared dead when one
# goes unanswered for 5 s (the agent's server accepts pings this often: agent/server.py).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel(target: str, authenticator: Authenticator, local_node: str | None = None,
            ) -> grpc.Channel:
    """An authenticated channel to the agent at `target`. `local_node` is this node's
    name as its agent knows it (the configuration's `node_name`): a credential for the
    local `unix:` socket names it; TCP targets name the address dialed."""
    return grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0),
                                               *KEEPALIVE_OPTIONS]),
        CredentialPlugin(authenticator, target, local_node or socket.gethostname()),
    )
