"""node_agent.dial: which agent a node name or target means, and how it is reached."""

from __future__ import annotations

import socket

import pytest

from node_agent import dial
from node_agent.config import AgentConfig


def test_agent_target_is_this_nodes_socket_or_the_node_named() -> None:
    cfg = AgentConfig(socket="/run/a.sock", port=411)
    assert dial.agent_target(cfg) == "unix:/run/a.sock"
    assert dial.agent_target(cfg, "") == "unix:/run/a.sock"
    assert dial.agent_target(cfg, "10.0.0.5") == "ipv4:10.0.0.5:411"
    assert dial.agent_target(cfg, "10.0.0.5:9000") == "ipv4:10.0.0.5:9000"
    assert dial.agent_target(cfg, "unix:/tmp/other.sock") == "unix:/tmp/other.sock"


@pytest.mark.parametrize(("spec", "target"), [
    ("fe80::1", "ipv6:[fe80::1]:411"),
    ("[fe80::1]", "ipv6:[fe80::1]:411"),
    ("[fe80::1]:9000", "ipv6:[fe80::1]:9000"),
    ("localhost:9000", "ipv4:127.0.0.1:9000"),     # /etc/hosts, never gRPC's own DNS
])
def test_target_of(spec: str, target: str) -> None:
    assert dial.target_of(spec, 411) == target


def test_an_unknown_node_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(*a: object, **k: object) -> None:   # no resolver asked from a test
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(ValueError, match="cannot resolve node name 'no-such-node.invalid'"):
        dial.target_of("no-such-node.invalid", 411)
