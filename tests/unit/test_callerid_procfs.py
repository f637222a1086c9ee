"""/proc walks on fake trees: socket owners (with uid and netns filters), races,
permission errors, /proc/<pid>/cgroup, stat and status parsing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from callerid import (
    KernelFormatError,
    ProcCgroup,
    WalkStats,
    find_socket_owner,
    find_socket_owner_all,
    netns_inode,
    pids,
    proc_start_ticks,
    proc_uid,
    read_proc_cgroups,
)
from tests.unit.conftest import FakeProc

ME = os.getuid()


def test_pids_sorted_and_numeric_only(fake_proc: FakeProc) -> None:
    for pid in (300, 2, 41):
        fake_proc.add_process(pid)
    (fake_proc.root / "sys").mkdir()
    (fake_proc.root / "12abc").mkdir()
    assert pids(fake_proc.root) == [2, 41, 300]


def test_netns_inode(fake_proc: FakeProc) -> None:
    fake_proc.add_process(10, netns="host")
    fake_proc.add_process(11, netns="node2")
    fake_proc.add_process(12, netns=None)  # ns/net missing: gone / not visible
    host = fake_proc.netns_ino("host")
    assert netns_inode("self", fake_proc.root) == host
    assert netns_inode(10, fake_proc.root) == host
    assert netns_inode(11, fake_proc.root) == fake_proc.netns_ino("node2") != host
    assert netns_inode(12, fake_proc.root) is None
    assert netns_inode(999, fake_proc.root) is None


def test_find_socket_owner_lowest_pid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(5, sockets=[100])
    fake_proc.add_process(7, sockets=[200, 300])
    fake_proc.add_process(9, sockets=[300])  # shared after fork: lowest pid wins
    stats = WalkStats()
    assert find_socket_owner(300, fake_proc.root, stats=stats) == 7
    assert stats.processes == 2 and stats.fds == 3 + 5
    assert find_socket_owner(100, fake_proc.root) == 5
    assert find_socket_owner(400, fake_proc.root) is None
    assert find_socket_owner_all(300, fake_proc.root) == 7


def test_find_socket_owner_matches_whole_link_only(fake_proc: FakeProc) -> None:
    # "socket:[12]" must not match inode 1 or 123, nor anon_inode / pipe links.
    fake_proc.add_process(5, fds={3: "socket:[123]", 4: "pipe:[1]", 5: "anon_inode:[eventfd]"})
    assert find_socket_owner(1, fake_proc.root) is None
    assert find_socket_owner(12, fake_proc.root) is None
    assert find_socket_owner(123, fake_proc.root) == 5


def test_inode_zero_has_no_owner(fake_proc: FakeProc) -> None:
    fake_proc.add_process(5, fds={3: "socket:[0]"})
    assert find_socket_owner(0, fake_proc.root) is None


def test_uid_filter_both_ways(fake_proc: FakeProc) -> None:
    # Directories are owned by the test's uid: filtering on it finds the socket,
    # filtering on any other uid skips the process without reading its fds.
    fake_proc.add_process(5, sockets=[100])
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, uid=ME, stats=stats) == 5
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, uid=ME + 1, stats=stats) is None
    assert stats.filtered == 1 and stats.processes == 0 and stats.fds == 0


@pytest.mark.root  # chowns the fake /proc dirs
def test_uid_filter_mixed_owners(fake_proc: FakeProc) -> None:
    fake_proc.add_process(5, sockets=[100], owner=1000)
    fake_proc.add_process(6, sockets=[100], owner=1001)  # same inode, other user
    assert find_socket_owner(100, fake_proc.root, uid=1001) == 6
    assert find_socket_owner(100, fake_proc.root, uid=1000) == 5
    assert find_socket_owner(100, fake_proc.root, uid=1002) is None


def test_netns_filter(fake_proc: FakeProc) -> None:
    # All lab nodes share one pid namespace: the walk must stay in ours.
    fake_proc.add_process(5, sockets=[100], netns="node2")
    fake_proc.add_process(6, sockets=[100], netns="host")
    fake_proc.add_process(7, sockets=[200], netns=None)  # cannot tell: does not count
    host = fake_proc.netns_ino("host")
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, netns=host, stats=stats) == 6
    assert stats.filtered == 1
    assert find_socket_owner(100, fake_proc.root, netns=fake_proc.netns_ino("node2")) == 5
    assert find_socket_owner(200, fake_proc.root, netns=host) is None
    assert find_socket_owner(200, fake_proc.root) == 7
    assert find_socket_owner_all(100, fake_proc.root, host) == 6


def test_race_fd_dir_points_nowhere(fake_proc: FakeProc) -> None:
    # A process that exited between listdir(/proc) and listdir(/proc/<pid>/fd).
    d = fake_proc.add_process(5, sockets=[100])
    shutil.rmtree(d / "fd")
    os.symlink(fake_proc.root / "nonexistent" / "fd", d / "fd")
    fake_proc.add_process(6, sockets=[100])
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, stats=stats) == 6
    assert stats.vanished == 1


def test_race_process_removed_between_listdir_and_readlink(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100])
    fake_proc.add_process(6, sockets=[100])
    real_listdir = os.listdir

    def listdir_then_exit(path: str) -> list[str]:
        names = real_listdir(path)
        if str(path) == f"{d5}/fd":
            shutil.rmtree(d5)  # the process exits right after we listed its fds
        return names

    monkeypatch.setattr(os, "listdir", listdir_then_exit)
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, stats=stats) == 6
    assert stats.processes == 2  # pid 5's fds were listed, then each readlink failed


def test_race_pid_dir_removed_before_stat(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100])
    fake_proc.add_process(6, sockets=[100])
    real_listdir = os.listdir

    def listdir_then_exit(path: str) -> list[str]:
        names = real_listdir(path)
        if str(path) == str(fake_proc.root) and d5.exists():
            shutil.rmtree(d5)  # exits after /proc was listed, before we look at it
        return names

    monkeypatch.setattr(os, "listdir", listdir_then_exit)
    for kwargs in ({"uid": ME}, {"netns": fake_proc.netns_ino()}):
        stats = WalkStats()
        assert find_socket_owner(100, fake_proc.root, stats=stats, **kwargs) == 6
        assert stats.vanished == 1
        fake_proc.add_process(5, sockets=[100])


def test_permission_error_on_listdir_is_skipped_and_counted(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100])
    fake_proc.add_process(6, sockets=[100])
    real_listdir = os.listdir

    def deny_pid5(path: str) -> list[str]:
        if str(path) == f"{d5}/fd":
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", deny_pid5)
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, stats=stats) == 6
    assert (stats.denied, stats.denied_pids) == (1, [5])
    assert "1 denied" in str(stats)


def test_permission_error_on_readlink_is_skipped_and_counted(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100])
    real_readlink = os.readlink

    def deny_pid5(path: str) -> str:
        if str(path).startswith(f"{d5}/fd/"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", deny_pid5)
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, stats=stats) is None
    assert stats.denied == 1 and stats.denied_pids == [5]
    assert stats.fds == 0  # stopped at the first refusal


def test_permission_error_on_ns_net_is_skipped_and_counted(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100])
    real_stat = os.stat

    def deny_ns(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path) == f"{d5}/ns/net":
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", deny_ns)
    stats = WalkStats()
    assert find_socket_owner(100, fake_proc.root, netns=fake_proc.netns_ino(), stats=stats) is None
    assert stats.denied == 1
    assert netns_inode(5, fake_proc.root) is None


def test_fd_closed_between_listdir_and_readlink(
    fake_proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    d5 = fake_proc.add_process(5, sockets=[100, 200])
    real_listdir = os.listdir

    def close_fd3(path: str) -> list[str]:
        names = real_listdir(path)
        if str(path) == f"{d5}/fd":
            os.unlink(d5 / "fd" / "3")
        return names

    monkeypatch.setattr(os, "listdir", close_fd3)
    assert find_socket_owner(200, fake_proc.root) == 5  # fd 4 is still read


# -- /proc/<pid>/cgroup ---------------------------------------------------------------------

HYBRID_CGROUP = (
    "12:name=systemd:/\n"
    "6:freezer:/callerid/job_42/main\n"
    "2:cpu,cpuacct:/\n"
    "1:name=lab:/a:b\n"
    "0::/callerid/job_42/main\n"
)


def test_read_proc_cgroups_hybrid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(5, cgroup=HYBRID_CGROUP)
    entries = read_proc_cgroups(5, fake_proc.root)
    assert entries == [
        ProcCgroup(12, ("name=systemd",), "/"),
        ProcCgroup(6, ("freezer",), "/callerid/job_42/main"),
        ProcCgroup(2, ("cpu", "cpuacct"), "/"),
        ProcCgroup(1, ("name=lab",), "/a:b"),  # ':' inside the path survives
        ProcCgroup(0, (), "/callerid/job_42/main"),
    ]
    assert entries[-1].is_v2 and not entries[0].is_v2


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("garbage", "ID:CONTROLLERS:PATH"),
        ("x:freezer:/", "not a number"),
        ("-1:freezer:/", "not a number"),
        ("6:freezer:relative", "not absolute"),
        ("6:cpu,,cpuacct:/", "empty controller"),
        ("0:freezer:/", "hierarchy 0"),
    ],
)
def test_read_proc_cgroups_malformed(fake_proc: FakeProc, line: str, why: str) -> None:
    d = fake_proc.add_process(5, cgroup="0::/\n" + line + "\n")
    with pytest.raises(KernelFormatError, match=why) as info:
        read_proc_cgroups(5, fake_proc.root)
    assert info.value.path == str(d / "cgroup")
    assert (info.value.lineno, info.value.line) == (2, line)


def test_read_proc_cgroups_vanished(fake_proc: FakeProc) -> None:
    with pytest.raises(ProcessLookupError):
        read_proc_cgroups(12345, fake_proc.root)


# -- stat and status ------------------------------------------------------------------------


@pytest.mark.parametrize("comm", ["sleep", "a b c", "evil) R 1 2 3", "((", ")"])
def test_proc_start_ticks_with_hostile_comm(fake_proc: FakeProc, comm: str) -> None:
    fake_proc.add_process(5, comm=comm, starttime=987654)
    assert proc_start_ticks(5, fake_proc.root) == 987654


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("5 sleep S 1 2 3\n", "comm"),
        ("5 (sleep) S 1 2 3\n", "fewer than 22"),
        ("5 (sleep) S " + " ".join(["0"] * 18) + " x 0 0\n", "not a number"),
        ("", "comm"),
    ],
)
def test_proc_start_ticks_malformed(fake_proc: FakeProc, text: str, why: str) -> None:
    d = fake_proc.add_process(5)
    (d / "stat").write_text(text)
    with pytest.raises(KernelFormatError, match=why):
        proc_start_ticks(5, fake_proc.root)


def test_proc_start_ticks_vanished(fake_proc: FakeProc) -> None:
    with pytest.raises(ProcessLookupError):
        proc_start_ticks(4242, fake_proc.root)


def test_proc_uid_is_the_real_uid(fake_proc: FakeProc) -> None:
    fake_proc.add_process(5, ruid=1234)  # effective 1235, saved 1236, fs 1237
    assert proc_uid(5, fake_proc.root) == 1234


@pytest.mark.parametrize("status", ["Name:\tx\n", "Uid:\t1\t2\n", "Uid:\ta\tb\tc\td\n"])
def test_proc_uid_malformed(fake_proc: FakeProc, status: str) -> None:
    d = fake_proc.add_process(5)
    (d / "status").write_text(status)
    with pytest.raises(KernelFormatError):
        proc_uid(5, fake_proc.root)


def test_proc_uid_vanished(fake_proc: FakeProc, tmp_path: Path) -> None:
    with pytest.raises(ProcessLookupError):
        proc_uid(4242, fake_proc.root)
