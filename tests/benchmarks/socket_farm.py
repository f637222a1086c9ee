"""A job's "socket farm" for the caller-ID benchmark (stdlib only, /usr/bin/python3).

    socket_farm.py OUTFILE --ipv4 A.B.C.D --ipv6 X::Y --conns N --per-holder S

Run as the main process of a job (``adoptctl job run ... -- /usr/bin/python3
socket_farm.py ...``). It listens on the node's own addresses (IPv4, IPv6 and a dual-stack
``[::]`` socket, all on ephemeral ports), opens N TCP connections to itself and accepts the
other end, so both ends of every connection live in this node and were created by this job.
Of the connections, 1 in 5 is IPv6 and 1 in 10 goes to the dual-stack listener (its accepted
end is an AF_INET6 socket with ``::ffff:`` addresses); the rest are plain IPv4.

Every socket gets SO_LINGER {1, 0}: when the job ends, its sockets are reset instead of
lingering in TIME_WAIT, so a later phase starts from a clean table.

The sockets are handed out in batches of S to child holders (``sleep``, inheriting exactly
that batch of fds), and the farm closes its own copies, so about 2N/S processes hold the
sockets and the farm itself needs only a few fds at a time (RLIMIT_NOFILE stays at its
default). Then it writes OUTFILE (atomically: OUTFILE.tmp, then rename)::

    conn KIND CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT    (one per connection,
                                                               from the client's side)
    pids FARM_PID HOLDER_PID ...

and sleeps until killed (its exit would end the job).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys

LINGER_RESET = struct.pack("ii", 1, 0)


def _listener(family: int, host: str, dual: bool = False) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
    s.bind((host, 0))
    s.listen(1024)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outfile")
    p.add_argument("--ipv4", required=True)
    p.add_argument("--ipv6", required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--per-holder", type=int, required=True)
    args = p.parse_args()

    v4 = _listener(socket.AF_INET, args.ipv4)
    v6 = _listener(socket.AF_INET6, args.ipv6)
    dual = _listener(socket.AF_INET6, "::", dual=True)
    dual_port = dual.getsockname()[1]
    lines: list[str] = []
    pending: list[socket.socket] = []
    holders: list[subprocess.Popen[bytes]] = []

    def hand_out(batch: list[socket.socket]) -> None:
        fds = [s.fileno() for s in batch]
        holders.append(subprocess.Popen(
            ["sleep", "1000000"], pass_fds=fds, close_fds=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        for s in batch:
            s.close()

    for i in range(args.conns):
        if i % 5 == 1:
            kind, family, listener, addr = "v6", socket.AF_INET6, v6, v6.getsockname()[:2]
        elif i % 10 == 3:
            kind, family, listener, addr = "dual", socket.AF_INET, dual, (args.ipv4, dual_port)
        else:
            kind, family, listener, addr = "v4", socket.AF_INET, v4, v4.getsockname()
        client = socket.socket(family, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client.connect(addr)
        server, _ = listener.accept()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        local, remote = client.getsockname(), client.getpeername()
        lines.append(f"conn {kind} {local[0]} {local[1]} {remote[0]} {remote[1]}\n")
        pending += [client, server]
        while len(pending) >= args.per_holder:
            hand_out(pending[: args.per_holder])
            del pending[: args.per_holder]
    if pending:
        hand_out(pending)
    for s in (v4, v6, dual):
        s.close()

    tmp = args.outfile + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.write("pids " + " ".join(str(x) for x in [os.getpid(), *(h.pid for h in holders)]))
        f.write("\n")
    os.rename(tmp, args.outfile)
    sys.stdout.flush()
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
