"""Ask an agent for an ssh-to-job session directly, without ssh-to-job's locate step
(tests/integration/test_ssh_to_job_attacks.py): what a hand-made client learns.

    open_job_shell.py NODE JOBID

Sends one ``open`` frame (with a well-formed public key) to NODE's agent as the calling
user (MUNGE, the node's agent.toml) and prints one line: ``OPENED`` if a session opened
(it is cancelled at once), else ``STATUS_CODE: details``.
"""

import sys
from collections.abc import Iterator

import grpc

from node_agent import config as config_mod
from node_agent.auth import MungeAuthenticator
from node_agent.client import AgentClient
from node_agent.dial import agent_target
from node_agent.proto.v1 import agent_pb2 as pb

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVtdmrVZmpHYDyJfdKD6WIOI1yQBmz2gWfCJHO7E1Jv "
       "probe")


def main() -> None:
    node, job_id = sys.argv[1], sys.argv[2]
    cfg = config_mod.find(None)
    auth = MungeAuthenticator(cfg.munge.socket, cfg.munge.library)

    def frames() -> Iterator[pb.ShellFrame]:
        yield pb.ShellFrame(open=pb.ShellOpen(job_id=job_id, public_key=KEY, shells=[],
                                              client="open_job_shell probe"))

    with AgentClient(agent_target(cfg, node), auth) as client:
        call = client.open_job_shell(frames())
        try:
            next(call)
            print("OPENED")
            call.cancel()
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
