"""Drive a PAM account stack the way sshd does, for one real TCP connection.

    pam_probe.py OUTFILE LISTEN_HOST PORT SERVICE USER

Listens on LISTEN_HOST:PORT, accepts ONE connection, then runs
`pamtester -v -I rhost=<peer> SERVICE USER acct_mgmt` with the accepted socket
inherited (as the module would find it under sshd) and SSH_CONNECTION set from it.
Writes "ready" to OUTFILE.ready once listening, and a JSON result to OUTFILE:
{"rc", "stdout", "stderr", "ssh_connection", "seconds"}. Closes the connection after.
"""

import json
import os
import socket
import subprocess
import sys
import time


def main() -> None:
    out, host, port, service, user = sys.argv[1:6]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(1)
    with open(out + ".ready", "w") as f:
        f.write("ready\n")
    conn, peer = s.accept()
    local = conn.getsockname()
    ssh_connection = f"{peer[0]} {peer[1]} {local[0]} {local[1]}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SSH_CONNECTION": ssh_connection}
    t0 = time.monotonic()
    r = subprocess.run(["pamtester", "-v", "-I", f"rhost={peer[0]}", service, user,
                        "acct_mgmt"], env=env, pass_fds=(conn.fileno(),),
                       capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - t0
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                   "ssh_connection": ssh_connection, "seconds": seconds}, f)
    os.rename(tmp, out)
    conn.close()


if __name__ == "__main__":
    main()
