"""node_agent/pbconv.py: the one conversion of a connection to and from its message."""

from __future__ import annotations

import pytest

from node_agent.client import AgentClient
from node_agent.errors import InvalidRequest
from node_agent.pbconv import connection_from_pb, connection_to_pb
from node_agent.proto.v1 import agent_pb2 as pb


@pytest.mark.parametrize("src, dst", [(("10.0.0.1", 40000), ("10.0.0.2", 22)),
                                      (("fd00::1", 40000), ("fd00::2", 2222))])
def test_a_connection_survives_the_wire_as_the_asked_node_sees_it(
        src: tuple[str, int], dst: tuple[str, int]) -> None:
    conn = AgentClient.connection(*src, *dst)  # SSH_CONNECTION order
    msg = connection_to_pb(conn)
    # The message keeps SSH_CONNECTION's order; on the node asked, src is the local end.
    assert (msg.src_ip, msg.src_port, msg.dst_ip, msg.dst_port) == (*src, *dst)
    back = connection_from_pb(msg)
    assert back == conn
    assert (str(back.local.ip), back.local.port) == src


def test_ipv4_mapped_addresses_are_normalised_once() -> None:
    conn = AgentClient.connection("::ffff:10.0.0.1", 40000, "::ffff:10.0.0.2", 22)
    assert connection_to_pb(conn).src_ip == "10.0.0.1"
    msg = pb.Connection(src_ip="::ffff:10.0.0.1", src_port=40000, dst_ip="10.0.0.2",
                        dst_port=22)
    assert connection_from_pb(msg) == conn


@pytest.mark.parametrize("msg", [
    pb.Connection(), pb.Connection(src_ip="10.0.0.1", src_port=0, dst_ip="10.0.0.2",
                                   dst_port=22),
    pb.Connection(src_ip="fe80::1%eth0", src_port=1, dst_ip="10.0.0.2", dst_port=22),
])
def test_an_invalid_message_is_an_invalid_request(msg: pb.Connection) -> None:
    with pytest.raises(InvalidRequest):
        connection_from_pb(msg)
