"""callerid's types to and from the gRPC messages: the one place they are converted.

A TCP connection is a `callerid.Connection` from where the agent's admission parses a
login's SSH_CONNECTION, through the client, to the source node's lookup; it becomes a
`Connection` message only on the wire, here. The message keeps OpenSSH's order (`src` is
the ssh client, on the node asked; `dst` sshd), which is the asked node's view: its
local end is `src` (callerid.Connection.from_ssh_connection).
"""

from __future__ import annotations

import callerid
from node_agent.errors import InvalidRequest
from node_agent.proto.v1 import agent_pb2 as pb


def connection_to_pb(conn: callerid.Connection) -> pb.Connection:
    """The message asking the node where `conn` is local (the ssh client's node)."""
    return pb.Connection(src_ip=str(conn.local.ip), src_port=conn.local.port,
                         dst_ip=str(conn.remote.ip), dst_port=conn.remote.port)


def connection_from_pb(msg: pb.Connection) -> callerid.Connection:
    """A request's connection, validated (raises InvalidRequest), as seen from here."""
    try:
        src = callerid.Endpoint(callerid.normalize_ip(msg.src_ip), msg.src_port)
        dst = callerid.Endpoint(callerid.normalize_ip(msg.dst_ip), msg.dst_port)
    except ValueError as e:
        raise InvalidRequest(f"invalid connection: {e}") from None
    if not (src.port and dst.port):
        raise InvalidRequest("invalid connection: ports must be 1..65535")
    return callerid.Connection.from_ssh_connection(src, dst)

