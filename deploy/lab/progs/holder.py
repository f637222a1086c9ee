"""Open TCP connections and hold them: a job's process that talks to other nodes.

    holder.py OUTFILE TARGET [TARGET ...]

TARGET is HOST:PORT ("[v6]:port"), or "mapped:A.B.C.D:PORT" for an AF_INET6 socket
connecting to ::ffff:A.B.C.D. After connecting, writes one line per connection,
"LOCAL_IP LOCAL_PORT REMOTE_IP REMOTE_PORT KIND", to OUTFILE (atomically), then
starts a child `sleep` (so the job has more than one process) and sleeps forever.
"""

import os
import socket
import subprocess
import sys
import time


def main() -> None:
    out, targets = sys.argv[1], sys.argv[2:]
    held, lines = [], []
    for t in targets:
        kind = "v4"
        if t.startswith("mapped:"):
            kind = "client-mapped"
            host, _, port = t[len("mapped:"):].rpartition(":")
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.connect(("::ffff:" + host, int(port)))
        else:
            host, _, port = t.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            kind = "v6" if family == socket.AF_INET6 else "v4"
            s = socket.socket(family, socket.SOCK_STREAM)
            s.connect((host, int(port)))
        held.append(s)
        local, remote = s.getsockname(), s.getpeername()
        lines.append(f"{local[0]} {local[1]} {remote[0]} {remote[1]} {kind}\n")
    child = subprocess.Popen(["sleep", "100000"])
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.write(f"pids {os.getpid()} {child.pid}\n")
    os.rename(tmp, out)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
