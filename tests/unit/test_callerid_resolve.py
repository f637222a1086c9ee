"""The resolution chain on fake trees: a scripted sock_diag, a fake locator, fake /proc."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence

import pytest

from callerid import (
    METHOD_CGROUP_ID,
    METHOD_FD_WALK,
    METHOD_NOT_FOUND,
    METHOD_PROCFS_SCAN,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Connection,
    DiagSocket,
    Endpoint,
    NetlinkUnavailable,
    ProcCgroup,
    Resolver,
)
from tests.unit.conftest import FakeProc

ME = os.getuid()
CONN = Connection(Endpoint.parse("10.0.0.1:40000"), Endpoint.parse("10.0.0.2:22"))
OTHER = Connection(Endpoint.parse("10.0.0.1:40001"), Endpoint.parse("10.0.0.2:22"))


class FakeDiag:
    def __init__(self, sockets: dict[Connection, DiagSocket], fail: OSError | None = None):
        self.sockets = sockets
        self.fail = fail
        self.asked: list[Connection] = []
        self.closed = False

    def lookup(self, conn: Connection) -> DiagSocket | None:
        self.asked.append(conn)
        if self.fail is not None:
            raise self.fail
        return self.sockets.get(conn)

    def close(self) -> None:
        self.closed = True


class FakeLocator:
    """Jobs by cgroup id, and by v2 path prefix "/jobs/<id>"."""

    def __init__(self, by_id: dict[int, str]) -> None:
        self.by_id = by_id
        self.id_queries: list[int] = []
        self.path_queries: list[list[ProcCgroup]] = []

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        self.id_queries.append(cgroup_id)
        return self.by_id.get(cgroup_id)

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        self.path_queries.append(list(entries))
        for e in entries:
            if e.is_v2 and e.path.startswith("/jobs/"):
                return e.path.split("/")[2]
        return None


def diag_socket(inode: int, uid: int = ME, cgroup_id: int | None = 500) -> DiagSocket:
    return DiagSocket(
        CONN.local, CONN.remote, TCP_ESTABLISHED, uid, inode, cgroup_id, socket.AF_INET
    )


def test_cgroup_id_hit_needs_no_walk(fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_walk(path: str) -> list[str]:
        raise AssertionError("the fd walk must not run on a cgroup-id hit")

    locator = FakeLocator({500: "42"})
    r = Resolver(locator, fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    monkeypatch.setattr(os, "listdir", no_walk)
    res = r.resolve(CONN)
    assert (res.job_id, res.method, res.pid, res.uid, res.inode) == (
        "42",
        METHOD_CGROUP_ID,
        None,
        ME,
        9001,
    )
    assert [s.name for s in res.steps] == ["sock_diag", "cgroup-id"]
    assert "inode 9001" in res.steps[0].detail and "cgroup 500" in res.steps[0].detail
    assert all(s.micros >= 0 for s in res.steps)
    assert locator.id_queries == [500]


def test_cgroup_id_hit_with_want_pid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/99/main\n")
    locator = FakeLocator({500: "42"})
    r = Resolver(locator, fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    res = r.resolve(CONN, want_pid=True)
    # The cgroup id names the job (where the socket was made); the pid comes from the walk.
    assert (res.job_id, res.pid, res.method) == ("42", 300, METHOD_CGROUP_ID)
    assert [s.name for s in res.steps] == ["sock_diag", "cgroup-id", "fd-walk"]


def test_miss_falls_back_to_walk_restricted_to_uid_and_netns(fake_proc: FakeProc) -> None:
    # Same inode visible in three processes: another netns (other lab node), and ours.
    fake_proc.add_process(100, sockets=[9001], netns="node2", cgroup="0::/jobs/wrong/main\n")
    fake_proc.add_process(200, sockets=[1234])
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    locator = FakeLocator({})  # the socket's cgroup is not a job cgroup
    r = Resolver(locator, fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    res = r.resolve(CONN)
    assert (res.job_id, res.pid, res.method) == ("42", 300, METHOD_FD_WALK)
    assert [s.name for s in res.steps] == ["sock_diag", "cgroup-id", "fd-walk", "pid-cgroup"]
    assert f"uid {ME}" in res.steps[2].detail and "1 filtered" in res.steps[2].detail
    assert "/jobs/42/main" in res.steps[3].detail
    assert locator.path_queries == [[ProcCgroup(0, (), "/jobs/42/main")]]


def test_walk_uses_the_socket_uid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    r = Resolver(
        FakeLocator({}), fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001, uid=ME + 1)})
    )
    res = r.resolve(CONN)
    # The only holder is owned by another uid than the socket's: not searched.
    assert (res.job_id, res.pid, res.uid, res.method) == (None, None, ME + 1, METHOD_FD_WALK)


def test_no_cgroup_id_from_kernel_goes_straight_to_walk(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    locator = FakeLocator({})
    r = Resolver(locator, fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001, cgroup_id=None)}))
    res = r.resolve(CONN)
    assert (res.job_id, res.pid) == ("42", 300)
    assert locator.id_queries == []
    assert [s.name for s in res.steps] == ["sock_diag", "fd-walk", "pid-cgroup"]


def test_pid_not_in_a_job(fake_proc: FakeProc) -> None:
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/user.slice\n")
    r = Resolver(FakeLocator({}), fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    res = r.resolve(CONN)
    assert (res.job_id, res.pid, res.method) == (None, 300, METHOD_FD_WALK)


def test_pid_exits_before_cgroups_are_read(fake_proc: FakeProc) -> None:
    d = fake_proc.add_process(300, sockets=[9001])
    (d / "cgroup").unlink()  # the process is gone by the time we read it
    r = Resolver(FakeLocator({}), fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    res = r.resolve(CONN)
    assert (res.job_id, res.pid) == (None, 300)
    assert "exited" in res.steps[-1].detail


def test_not_found(fake_proc: FakeProc) -> None:
    locator = FakeLocator({500: "42"})
    diag = FakeDiag({CONN: diag_socket(9001)})
    r = Resolver(locator, fake_proc.root, diag=diag)
    res = r.resolve(OTHER)
    assert (res.job_id, res.pid, res.uid, res.inode, res.method) == (
        None,
        None,
        None,
        None,
        METHOD_NOT_FOUND,
    )
    assert res.connection == OTHER and diag.asked == [OTHER]
    assert locator.id_queries == []
    assert "no such connection" in res.steps[0].detail


def test_debug_log_line_per_step(fake_proc: FakeProc, caplog: pytest.LogCaptureFixture) -> None:
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    r = Resolver(FakeLocator({}), fake_proc.root, diag=FakeDiag({CONN: diag_socket(9001)}))
    with caplog.at_level(logging.DEBUG, logger="callerid"):
        r.resolve(CONN)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "callerid"]
    assert len(lines) == 4
    assert "10.0.0.1:40000 -> 10.0.0.2:22 -> inode 9001" in lines[0]
    assert "pid 300" in lines[-1] and "job 42" in lines[-1]


def test_netlink_error_falls_back_to_procfs(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("10.0.0.1", 40000), ("10.0.0.2", 22), inode=9001, uid=ME)
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    diag = FakeDiag({}, fail=OSError(errno.ENOBUFS, "No buffer space available"))
    res = Resolver(FakeLocator({}), fake_proc.root, diag=diag).resolve(CONN)
    assert (res.job_id, res.pid, res.method) == ("42", 300, METHOD_PROCFS_SCAN)
    assert res.steps[0].name == "sock_diag" and "error" in res.steps[0].detail


def test_slurm_style_reference(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("0.0.0.0", 22), ("0.0.0.0", 0), state=TCP_LISTEN, inode=10, uid=0)
    fake_proc.add_tcp(("10.0.0.1", 40000), ("10.0.0.2", 22), inode=9001, uid=1234)
    fake_proc.add_process(100, sockets=[9001], netns="node2", cgroup="0::/jobs/wrong\n")
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    diag = FakeDiag({})
    r = Resolver(FakeLocator({}), fake_proc.root, diag=diag)
    res = r.resolve_slurm_style(CONN)
    assert (res.job_id, res.pid, res.uid, res.inode, res.method) == (
        "42",
        300,
        1234,
        9001,
        METHOD_PROCFS_SCAN,
    )
    assert [s.name for s in res.steps] == ["proc-net-tcp", "fd-walk-all", "pid-cgroup"]
    assert diag.asked == []  # no netlink on this path
    assert r.resolve_slurm_style(OTHER).method == METHOD_NOT_FOUND


def test_slurm_style_mapped_addresses(fake_proc: FakeProc) -> None:
    # sshd-like dual-stack socket on [::]: tcp6 holds ::ffff: addresses; asked in plain v4.
    fake_proc.add_tcp(("::ffff:10.0.0.1", 40000), ("::ffff:10.0.0.2", 22), inode=9001, v6=True)
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/42/main\n")
    res = Resolver(FakeLocator({}), fake_proc.root, use_netlink=False).resolve(CONN)
    assert (res.job_id, res.pid, res.method) == ("42", 300, METHOD_PROCFS_SCAN)


def test_slurm_style_socket_without_holder(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("10.0.0.1", 40000), ("10.0.0.2", 22), inode=9001)
    res = Resolver(FakeLocator({}), fake_proc.root, use_netlink=False).resolve(CONN)
    assert (res.job_id, res.pid, res.inode, res.method) == (None, None, 9001, METHOD_PROCFS_SCAN)


def test_without_netlink_resolve_is_the_procfs_path(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("10.0.0.1", 40000), ("10.0.0.2", 22), inode=9001)
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/7/main\n")
    r = Resolver(FakeLocator({}), fake_proc.root, use_netlink=False)
    assert not r.uses_netlink
    res = r.resolve(CONN, want_pid=True)
    assert (res.job_id, res.pid, res.method) == ("7", 300, METHOD_PROCFS_SCAN)


def test_netlink_unavailable_is_logged_once_and_falls_back(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import callerid._resolve as resolve_mod

    def unavailable() -> None:
        raise NetlinkUnavailable("cannot open a NETLINK_SOCK_DIAG socket: nope")

    monkeypatch.setattr(resolve_mod, "SockDiag", unavailable)
    monkeypatch.setattr(Resolver, "_warned_no_netlink", False)
    fake_proc.add_tcp(("10.0.0.1", 40000), ("10.0.0.2", 22), inode=9001)
    fake_proc.add_process(300, sockets=[9001], cgroup="0::/jobs/7/main\n")
    with caplog.at_level(logging.WARNING, logger="callerid"):
        r1 = Resolver(FakeLocator({}), fake_proc.root)
        r2 = Resolver(FakeLocator({}), fake_proc.root)
    assert not r1.uses_netlink and not r2.uses_netlink
    assert caplog.text.count("falling back") == 1
    assert r1.resolve(CONN).method == METHOD_PROCFS_SCAN


def test_close_leaves_an_injected_diag_open(fake_proc: FakeProc) -> None:
    diag = FakeDiag({})
    r = Resolver(FakeLocator({}), fake_proc.root, diag=diag)
    r.close()
    assert not diag.closed  # not ours to close
    assert not r.uses_netlink
