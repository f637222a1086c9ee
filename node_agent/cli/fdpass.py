"""ssh-to-job's ProxyCommand: hand ssh a connection to the ssh-to-job process that runs it.

ssh runs this with ``ProxyUseFdpass yes``: its stdout is one end of a socket pair, on
which ssh waits for a file descriptor (OpenSSH sshconnect.c, ssh_proxy_fdpass_connect).
This connects to the Unix socket that ssh-to-job listens on in its private (0700) temp
directory, passes the connected socket to ssh with one byte (SCM_RIGHTS), and exits; ssh
then talks to ssh-to-job directly, which relays to the agent's gRPC stream. Run as
``python -I -S fdpass.py SOCKET`` (standard library only, no site: ~10 ms).
"""

import socket
import sys

BUFFER = 1 << 20  # ask for large socket buffers: bulk copies move in bigger frames


def main() -> int:
    """Connect to SOCKET and hand the connection to ssh (ProxyUseFdpass); the exit status."""
    if len(sys.argv) != 2:
        sys.stderr.write("usage: fdpass.py SOCKET (ssh-to-job's ProxyCommand)\n")
        return 2
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        conn.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
    try:
        conn.connect(sys.argv[1])
        to_ssh = socket.socket(fileno=1)
        socket.send_fds(to_ssh, [b"\0"], [conn.fileno()])
    except OSError as e:
        sys.stderr.write(f"ssh-to-job proxy: {sys.argv[1]}: {e.strerror or e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
