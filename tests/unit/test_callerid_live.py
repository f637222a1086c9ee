"""Live checks against this kernel: real loopback TCP pairs on port 0, looked up through
NETLINK_SOCK_DIAG and through /proc, which must agree. No root needed, no lab, no cgroup
writes (the cgroup id is only compared with a stat of this process's own v2 cgroup).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from callerid import (
    METHOD_CGROUP_ID,
    METHOD_FD_WALK,
    METHOD_NOT_FOUND,
    METHOD_PROCFS_SCAN,
    TCP_ESTABLISHED,
    Connection,
    Endpoint,
    NetlinkUnavailable,
    ProcCgroup,
    Resolver,
    SockDiag,
    find_in_tables,
    find_socket_owner,
    find_socket_owner_all,
    netns_inode,
    read_proc_cgroups,
)

Pair = tuple[socket.socket, socket.socket]  # (client, accepted server side)


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    try:
        d = SockDiag()
    except NetlinkUnavailable as exc:
        pytest.skip(f"netlink sock_diag unavailable here: {exc}")
    with d:
        yield d


def _pair(family: int, listen_addr: str, connect_addr: str, v6only: bool | None = None) -> Pair:
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if v6only is not None:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        listener.bind((listen_addr, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection((connect_addr, port), timeout=5)
        server, _ = listener.accept()
    return client, server


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


PAIRS = {
    "ipv4": (socket.AF_INET, "127.0.0.1", "127.0.0.1", None),
    "ipv6": (socket.AF_INET6, "::1", "::1", True),
    # A [::] listener accepting a v4 client: the server side is ::ffff:127.0.0.1.
    "dual-stack": (socket.AF_INET6, "::", "127.0.0.1", False),
}


@pytest.fixture(params=sorted(PAIRS))
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    family, listen_addr, connect_addr, v6only = PAIRS[request.param]
    if family == socket.AF_INET6 and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    client, server = _pair(family, listen_addr, connect_addr, v6only)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def conn_of(sock: socket.socket) -> Connection:
    """The connection as seen from *sock*'s end (local = its own address)."""
    local, remote = sock.getsockname(), sock.getpeername()
    return Connection(Endpoint.parse(_fmt(local)), Endpoint.parse(_fmt(remote)))


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def own_v2_cgroup_dir() -> Path | None:
    """This process's cgroup v2 directory: the cgroup2 mount + the "0::" path."""
    mount = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            if fields[sep + 1] == "cgroup2":
                mount = fields[4].replace("\\040", " ")
    if mount is None:
        return None
    for entry in read_proc_cgroups("self"):
        if entry.is_v2:
            return Path(mount + entry.path.rstrip("/"))
    return None


def test_lookup_both_ends(diag: SockDiag, pair: Pair) -> None:
    for sock in pair:
        conn = conn_of(sock)
        found = diag.lookup(conn)
        assert found is not None, conn
        assert found.inode == inode_of(sock)
        assert found.uid == os.geteuid()
        assert found.state == TCP_ESTABLISHED
        assert (found.local, found.remote) == (conn.local, conn.remote)
        assert found.family == sock.family


def test_dual_stack_server_side_is_mapped_and_normalised(diag: SockDiag) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 here")
    client, server = _pair(socket.AF_INET6, "::", "127.0.0.1", v6only=False)
    with client, server:
        assert server.getsockname()[0] == "::ffff:127.0.0.1"
        conn = conn_of(server)
        assert conn.local.ip.version == 4  # collapsed
        found = diag.lookup(conn)
        assert found is not None and found.inode == inode_of(server)
        assert found.family == socket.AF_INET6
        # Asking with the raw mapped text gives the same answer.
        raw = Connection(
            Endpoint.parse(f"[::ffff:127.0.0.1]:{conn.local.port}"),
            Endpoint.parse(f"[::ffff:127.0.0.1]:{conn.remote.port}"),
        )
        assert diag.lookup(raw) == found


def test_cgroup_id_is_our_v2_cgroup_inode(diag: SockDiag, pair: Pair) -> None:
    cgdir = own_v2_cgroup_dir()
    if cgdir is None or not cgdir.is_dir():
        pytest.skip("no cgroup v2 hierarchy mounted here")
    found = diag.lookup(conn_of(pair[0]))
    assert found is not None
    if found.cgroup_id is None:
        pytest.skip("kernel sends no INET_DIAG_CGROUP_ID (< 5.9)")
    assert found.cgroup_id == os.stat(cgdir).st_ino


def test_listener_is_not_a_connection(diag: SockDiag, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        conn = Connection(Endpoint.parse(f"127.0.0.1:{port}"), Endpoint.parse("127.0.0.9:1"))
        with caplog.at_level(logging.DEBUG, logger="callerid"):
            assert diag.lookup(conn) is None
        # The kernel did answer, with the listener: the validation is what said no.
        assert "LISTEN" in caplog.text


def test_no_such_connection(diag: SockDiag) -> None:
    with socket.socket(socket.AF_INET) as s:
        s.bind(("127.0.0.1", 0))  # a port nobody listens on or connects from
        port = s.getsockname()[1]
        conn = Connection(Endpoint.parse(f"127.0.0.1:{port}"), Endpoint.parse("127.0.0.1:9"))
        assert diag.lookup(conn) is None
    v6 = Connection(Endpoint.parse("[::1]:9"), Endpoint.parse("[::1]:9"))
    assert diag.lookup(v6) is None


def test_time_wait_is_not_a_connection(diag: SockDiag, caplog: pytest.LogCaptureFixture) -> None:
    client, server = _pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    conn = conn_of(client)
    assert diag.lookup(conn) is not None
    client.close()  # active close: the client's end goes to TIME_WAIT ...
    server.close()  # ... once the server's FIN arrives
    deadline = time.monotonic() + 5
    with caplog.at_level(logging.DEBUG, logger="callerid"):
        while diag.lookup(conn) is not None:
            assert time.monotonic() < deadline, "the closed connection is still found"
            time.sleep(0.01)
    # The kernel still knows the 4-tuple (TIME_WAIT lasts 60 s): the answer was refused.
    assert "TIME_WAIT" in caplog.text


def test_netlink_and_procfs_agree(diag: SockDiag, pair: Pair) -> None:
    netns = netns_inode()
    for sock in pair:
        conn = conn_of(sock)
        via_netlink = diag.lookup(conn)
        via_proc = find_in_tables(conn)
        assert via_netlink is not None and via_proc is not None
        assert via_proc.inode == via_netlink.inode == inode_of(sock)
        assert via_proc.uid == via_netlink.uid
        assert (via_proc.local, via_proc.remote) == (via_netlink.local, via_netlink.remote)
        assert find_socket_owner_all(via_proc.inode, netns=netns) == os.getpid()
        assert find_socket_owner(via_netlink.inode, uid=via_netlink.uid, netns=netns) == os.getpid()


class OwnCgroupLocator:
    """Claims this test process's own cgroup as job "live" (no cgroup is created)."""

    def __init__(self, cgroup_id: int | None, v2_path: str | None) -> None:
        self.cgroup_id = cgroup_id
        self.v2_path = v2_path

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        return "live" if cgroup_id == self.cgroup_id else None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        for e in entries:
            if e.is_v2 and e.path == self.v2_path:
                return "live-by-path"
        return None


def _own_v2_path() -> str | None:
    return next((e.path for e in read_proc_cgroups("self") if e.is_v2), None)


def test_resolver_live(diag: SockDiag, pair: Pair) -> None:
    client = pair[0]
    conn = conn_of(client)
    found = diag.lookup(conn)
    assert found is not None
    v2_path = _own_v2_path()
    with contextlib.closing(Resolver(OwnCgroupLocator(found.cgroup_id, v2_path))) as r:
        assert r.uses_netlink
        if found.cgroup_id is not None:
            res = r.resolve(conn)
            assert (res.job_id, res.method, res.inode) == ("live", METHOD_CGROUP_ID, found.inode)
            res = r.resolve(conn, want_pid=True)
            assert (res.job_id, res.pid) == ("live", os.getpid())
    if v2_path is None:
        pytest.skip("no cgroup v2 line in /proc/self/cgroup")
    # A locator that does not know the cgroup id: the fd walk and the pid's cgroup path.
    with contextlib.closing(Resolver(OwnCgroupLocator(None, v2_path))) as r:
        res = r.resolve(conn)
        assert (res.job_id, res.pid, res.uid, res.method) == (
            "live-by-path",
            os.getpid(),
            os.geteuid(),
            METHOD_FD_WALK,
        )
        ref = r.resolve_slurm_style(conn)
        assert (ref.job_id, ref.pid, ref.inode, ref.method) == (
            "live-by-path",
            os.getpid(),
            res.inode,
            METHOD_PROCFS_SCAN,
        )
        gone = Connection(conn.local, Endpoint(conn.remote.ip, 9))
        assert r.resolve(gone).method == METHOD_NOT_FOUND
        assert r.resolve_slurm_style(gone).method == METHOD_NOT_FOUND
