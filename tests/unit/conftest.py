"""Shared fixtures for unit tests.

Fake /proc and cgroupfs trees (used by tests/unit/test_callerid_*.py)
--------------------------------------------------------------------
psutil-style: the library takes its procfs and cgroup mount roots as parameters, so the
tests build small trees under ``tmp_path`` that look like the kernel's files:

- ``fake_proc``: ``<root>/<pid>/{fd/N -> "socket:[ino]", cgroup, stat, status, ns/net}``,
  ``<root>/self/{net/tcp, net/tcp6, ns/net, mountinfo}``. A network namespace is a
  regular file; processes in the same namespace get hard links to it, so their
  ``ns/net`` share one ``st_ino`` exactly as nsfs inodes do.
- ``fake_cgroup``: mount points under ``<tmp>/cgroup`` (plain directories; control files
  are plain files that the tests create or read back) and the matching mountinfo lines.

Nothing here needs root, and nothing touches the real /proc or /sys/fs/cgroup.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

# The header the kernel prints (net/ipv4/tcp_ipv4.c tcp4_seq_show).
TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)


def kernel_hex_ip(ip: str, v6: bool) -> str:
    """Render *ip* the way the kernel prints it in /proc/net/tcp{,6}: each 32-bit word of
    the network-order address printed with %08X after a native-endian load. Written
    independently of the library so the tests check it rather than echo it."""
    if v6:
        if ":" not in ip:
            ip = "::ffff:" + ip
        packed = socket.inet_pton(socket.AF_INET6, ip)
    else:
        packed = socket.inet_pton(socket.AF_INET, ip)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words)


def kernel_endpoint(ip: str, port: int, v6: bool) -> str:
    return f"{kernel_hex_ip(ip, v6)}:{port:04X}"


class FakeProc:
    """A fake procfs root; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ns_dir = root.parent / (root.name + "-netns")
        self._ns_dir.mkdir(exist_ok=True)
        self.self_dir = root / "self"
        (self.self_dir / "net").mkdir(parents=True)
        (self.self_dir / "ns").mkdir()
        os.link(self.netns_file("host"), self.self_dir / "ns" / "net")
        self._tcp_rows: dict[bool, list[str]] = {False: [], True: []}
        self.set_tcp([], v6=False)
        self.set_tcp([], v6=True)

    # -- namespaces ----------------------------------------------------------------------
    def netns_file(self, name: str) -> Path:
        path = self._ns_dir / name
        if not path.exists():
            path.write_text(name)
        return path

    def netns_ino(self, name: str = "host") -> int:
        return self.netns_file(name).stat().st_ino

    # -- processes ---------------------------------------------------------------------
    def add_process(
        self,
        pid: int,
        *,
        fds: Mapping[int, str] | None = None,
        sockets: Iterable[int] = (),
        cgroup: str = "0::/\n",
        netns: str | None = "host",
        comm: str = "sleep",
        starttime: int = 4242,
        ruid: int = 1000,
        owner: int | None = None,
    ) -> Path:
        """Create ``<root>/<pid>``. *sockets* are socket inodes held from fd 3 on; *fds*
        maps other fd numbers to link targets. *owner* chowns the directory (root only;
        the default leaves it owned by the test's uid)."""
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        all_fds = {0: "/dev/null", 1: "pipe:[99]", 2: "/dev/pts/0"}
        all_fds.update({3 + i: f"socket:[{ino}]" for i, ino in enumerate(sockets)})
        all_fds.update(fds or {})
        for n, target in all_fds.items():
            os.symlink(target, d / "fd" / str(n))
        (d / "ns").mkdir()
        if netns is not None:
            os.link(self.netns_file(netns), d / "ns" / "net")
        (d / "cgroup").write_text(cgroup)
        # 52 fields; field 22 (starttime) is the 20th after the last ')'.
        after = ["S", "1", str(pid), str(pid)] + ["0"] * 15 + [str(starttime)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({comm}) {' '.join(after)}\n")
        (d / "status").write_text(
            f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\n"
            f"Pid:\t{pid}\nPPid:\t1\nUid:\t{ruid}\t{ruid + 1}\t{ruid + 2}\t{ruid + 3}\n"
            f"Gid:\t{ruid}\t{ruid}\t{ruid}\t{ruid}\n"
        )
        if owner is not None:
            os.chown(d, owner, -1)
        return d

    # -- socket tables -------------------------------------------------------------------
    @staticmethod
    def tcp_row(
        sl: int,
        local: tuple[str, int],
        remote: tuple[str, int],
        state: int,
        uid: int,
        inode: int,
        v6: bool = False,
    ) -> str:
        """One line as net/ipv4/tcp_ipv4.c get_tcp4_sock (or tcp6) prints it."""
        loc = kernel_endpoint(*local, v6=v6)
        rem = kernel_endpoint(*remote, v6=v6)
        return (
            f"{sl:4d}: {loc} {rem} {state:02X} 00000000:00000000 00:00000000 00000000 "
            f"{uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
        )

    def add_tcp(
        self,
        local: tuple[str, int],
        remote: tuple[str, int],
        *,
        state: int = 1,
        uid: int = 1000,
        inode: int,
        v6: bool = False,
    ) -> None:
        rows = self._tcp_rows[v6]
        rows.append(self.tcp_row(len(rows), local, remote, state, uid, inode, v6))
        self.set_tcp(rows, v6=v6)

    def set_tcp(self, rows: Iterable[str], *, v6: bool = False, header: bool = True) -> Path:
        path = self.self_dir / "net" / ("tcp6" if v6 else "tcp")
        path.write_text((TCP_HEADER if header else "") + "".join(rows))
        return path

    def set_mountinfo(self, text: str) -> Path:
        path = self.self_dir / "mountinfo"
        path.write_text(text)
        return path


class FakeCgroupFS:
    """Fake cgroup mounts under one root directory, plus matching mountinfo lines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lines: list[str] = [
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n",
            f"31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755\n",
        ]
        self._next_id = 40

    def _add_line(self, mountpoint: Path, fstype: str, super_opts: str) -> None:
        self._next_id += 1
        mp = str(mountpoint).replace(" ", "\\040")
        self._lines.append(
            f"{self._next_id} 31 0:{self._next_id} / {mp} rw,nosuid,nodev,noexec,relatime "
            f"shared:{self._next_id} - {fstype} {fstype} {super_opts}\n"
        )

    def mount_v1(self, dirname: str, options: str) -> Path:
        """A v1 hierarchy at <root>/<dirname> with super options ``rw,<options>``."""
        path = self.root / dirname
        path.mkdir()
        self._add_line(path, "cgroup", f"rw,{options}")
        return path

    def mount_v2(self, dirname: str = "unified") -> Path:
        path = self.root / dirname
        path.mkdir()
        self._add_line(path, "cgroup2", "rw,nsdelegate")
        return path

    def mount_elsewhere(self, path: Path, fstype: str, options: str) -> None:
        """A mount outside the root (must be ignored by discover)."""
        path.mkdir(parents=True, exist_ok=True)
        self._add_line(path, fstype, options)

    def mountinfo(self) -> str:
        return "".join(self._lines)


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


@pytest.fixture
def fake_cgroup(tmp_path: Path) -> FakeCgroupFS:
    return FakeCgroupFS(tmp_path / "cgroup")
