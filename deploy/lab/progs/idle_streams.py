"""Hold idle ssh-to-job streams against a node agent, as a hostile user would.

    idle_streams.py STATUS N [--name NODE] [--retry SECONDS]

Keeps N OpenJobShell streams open that never send a frame (no job is needed for that),
each with a valid MUNGE credential of the user's, minted as ssh-to-job mints its own
(node_agent.auth: for the node meant and a first frame, which never comes), on a plain
gRPC channel to the agent of NODE (default: this node's, through its local socket). A
stream that ends (refused, or ended by the agent) is opened again after --retry seconds
(default 1), so that N are always being attempted. Run it with the venv's python, as the
user whose streams they are.

Writes STATUS (JSON, replaced atomically) every 0.2 s and at exit:
``{"opened": streams opened so far, "outstanding": not ended yet,
"ended": {CODE: count}, "last": {CODE: details of the last one}}``.
Runs until SIGTERM or SIGINT, then cancels its streams.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from node_agent import config as config_mod
from node_agent import shellwire
from node_agent.auth import (
    METADATA_KEY,
    MungeAuthenticator,
    digest,
    request_credential,
    target_claim,
)
from node_agent.dial import agent_target
from node_agent.proto.v1 import agent_pb2 as pb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("status")
    ap.add_argument("n", type=int)
    ap.add_argument("--name", help="the node whose agent to hold (default: this node's)")
    ap.add_argument("--retry", type=float, default=1.0)
    args = ap.parse_args()
    cfg = config_mod.find()
    auth = MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
    target = agent_target(cfg, args.name)
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    open_shell = channel.stream_stream(shellwire.METHOD, request_serializer=shellwire.serialize,
                                       response_deserializer=shellwire.parse)
    never_sent = digest(pb.ShellFrame(open=pb.ShellOpen(job_id="idle")))
    claim_target = target_claim(target, cfg.node_name)

    stop = threading.Event()
    lock = threading.Lock()
    calls: set[Any] = set()
    ended: collections.Counter[str] = collections.Counter()
    last: dict[str, str] = {}
    due: list[float] = [0.0] * args.n  # when to (re)open each of the N
    opened = 0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def nothing() -> Iterator[Any]:
        stop.wait()  # sends no frame at all; half-closes at exit
        return
        yield

    def on_done(call: Any) -> None:
        code = call.code()
        with lock:
            calls.discard(call)
            name = code.name if code is not None else "?"
            ended[name] += 1
            last[name] = call.details() or ""
            due.append(time.monotonic() + args.retry)

    def write_status() -> None:
        with lock:
            data = {"opened": opened, "outstanding": len(calls), "ended": dict(ended),
                    "last": dict(last)}
        tmp = args.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, args.status)

    next_status = 0.0
    while not stop.is_set():
        now = time.monotonic()
        with lock:
            ready = [t for t in due if t <= now]
            due[:] = [t for t in due if t > now]
        for _ in ready:
            cred = request_credential(auth, shellwire.METHOD, claim_target, never_sent)
            call = open_shell(nothing(), metadata=[(METADATA_KEY, cred)])
            with lock:
                calls.add(call)
                opened += 1
            call.add_done_callback(on_done)
        if now >= next_status:
            write_status()
            next_status = now + 0.2
        stop.wait(0.02)
    with lock:
        pending = list(calls)
    for call in pending:
        call.cancel()
    write_status()
    channel.close()


if __name__ == "__main__":
    main()
