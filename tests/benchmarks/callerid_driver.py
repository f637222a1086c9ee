"""Time CallerId calls on request (runs inside a lab node, as root, with the venv's python).

    callerid_driver.py NODE

Reads lines "N SRC_IP SRC_PORT DST_IP DST_PORT"; for each, makes N sequential CallerId
calls about that connection to NODE's agent, over one channel (as an agent's PeerPool
does), with MUNGE credentials, and prints one JSON line: {"ms": [...], "outcomes": [...]}.
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from node_agent import config as config_mod
from node_agent.auth import MungeAuthenticator
from node_agent.client import AgentClient
from node_agent.dial import agent_target
from node_agent.proto.v1 import agent_pb2 as pb


def main() -> None:
    cfg = config_mod.find()
    auth = MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
    with AgentClient(agent_target(cfg, sys.argv[1]), auth, timeout=10) as client:
        for line in sys.stdin:
            n, src_ip, src_port, dst_ip, dst_port = line.split()
            conn = AgentClient.connection(src_ip, int(src_port), dst_ip, int(dst_port))
            ms, outcomes = [], []
            for _ in range(int(n)):
                t0 = time.perf_counter()
                try:
                    reply = client.caller_id(conn)
                    outcome = pb.CallerIdReply.Outcome.Name(reply.outcome)
                except grpc.RpcError as e:  # a timeout is a figure too
                    outcome = e.code().name
                ms.append((time.perf_counter() - t0) * 1000)
                outcomes.append(outcome)
            print(json.dumps({"ms": ms, "outcomes": outcomes}), flush=True)


if __name__ == "__main__":
    main()
