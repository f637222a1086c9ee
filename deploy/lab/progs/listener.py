"""Accept TCP connections on the given addresses and record each as the accepting
side sees it: one line "SRC_IP SRC_PORT DST_IP DST_PORT" (SSH_CONNECTION order).

    listener.py OUTFILE HOST:PORT [HOST:PORT ...]     ("[::]:5002" = dual-stack)

Writes "ready" to OUTFILE.ready once listening. Holds the connections until killed.
"""

import selectors
import socket
import sys


def main() -> None:
    out, addrs = sys.argv[1], sys.argv[2:]
    sel = selectors.DefaultSelector()
    held = []
    for spec in addrs:
        host, _, port = spec.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, int(port)))
        s.listen(4096)
        sel.register(s, selectors.EVENT_READ)
    with open(out + ".ready", "w") as f:
        f.write("ready\n")
    with open(out, "a", buffering=1) as f:
        while True:
            for key, _ in sel.select():
                conn, _ = key.fileobj.accept()
                held.append(conn)
                peer, local = conn.getpeername(), conn.getsockname()
                f.write(f"{peer[0]} {peer[1]} {local[0]} {local[1]}\n")


if __name__ == "__main__":
    main()
