"""Process-side readers of procfs: who holds a socket, in which cgroups a process is.

Every function takes the procfs root as a parameter so tests can point it at a fake tree
under ``tmp_path`` (psutil's ``PROCFS_PATH``, made explicit).

Races are the normal case here, not an error: a process listed by ``os.listdir(procfs)``
may exit before we read its ``fd`` directory, and an fd may be closed between ``listdir``
and ``readlink``. Such a process or fd is skipped where it happens. A process we may not
inspect (another user's ``fd`` needs ``CAP_SYS_PTRACE``, even for root: fs/proc/fd.c
``proc_fd_access_allowed`` -> ``ptrace_may_access``) is skipped and counted in
:class:`WalkStats`, so "not found" can be told apart from "not allowed to look".
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from ._errors import KernelFormatError

__all__ = [
    "ProcCgroup",
    "WalkStats",
    "find_socket_owner",
    "find_socket_owner_all",
    "netns_inode",
    "pids",
    "proc_start_ticks",
    "proc_uid",
    "read_proc_cgroups",
]

PathLike = str | os.PathLike[str]

# errnos meaning "this process is gone": ESRCH comes from some /proc files of a process
# that exited after its directory was opened.
_GONE = (errno.ENOENT, errno.ESRCH)
_DENIED = (errno.EACCES, errno.EPERM)


@dataclass
class WalkStats:
    """Counters of one ``/proc/*/fd`` walk; pass one as ``stats=`` to get them back.

    ``processes``: processes whose fds were read; ``fds``: fd links read; ``vanished``:
    processes (or ns/net links) that disappeared during the walk; ``denied``: processes
    skipped on EACCES/EPERM, with their pids in ``denied_pids``; ``filtered``: processes
    skipped because of the uid or netns filter.
    """

    processes: int = 0
    fds: int = 0
    vanished: int = 0
    denied: int = 0
    filtered: int = 0
    denied_pids: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.processes} processes, {self.fds} fds, {self.filtered} filtered, "
            f"{self.vanished} vanished, {self.denied} denied"
        )


@dataclass(frozen=True, slots=True)
class ProcCgroup:
    """One line of ``/proc/<pid>/cgroup`` (kernel/cgroup/cgroup.c ``proc_cgroup_show``).

    ``hierarchy_id`` is 0 and ``controllers`` empty for the cgroup v2 line (``0::/path``);
    a named v1 hierarchy shows its name as a controller (``name=systemd``). ``path`` is
    relative to the reader's cgroup-namespace root.
    """

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str

    @property
    def is_v2(self) -> bool:
        return self.hierarchy_id == 0 and not self.controllers


def _pid_dir(procfs: PathLike, pid: int | str) -> str:
    return f"{os.fspath(procfs)}/{pid}"


def _read_proc_file(path: str, pid: int | str) -> str:
    """Read a small per-process file, converting "the process is gone" to
    ProcessLookupError at this one boundary (psutil's ``wrap_exceptions``)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as exc:
        if exc.errno in _GONE:
            raise ProcessLookupError(errno.ESRCH, f"no such process: {pid}", path) from None
        raise


def pids(procfs: PathLike = "/proc") -> list[int]:
    """Every pid visible in *procfs*, ascending (so walks are deterministic)."""
    return sorted(int(name) for name in os.listdir(procfs) if name.isdigit())


def netns_inode(pid: int | str = "self", procfs: PathLike = "/proc") -> int | None:
    """The inode of ``<procfs>/<pid>/ns/net`` (the network namespace's nsfs inode), or None
    when the process is gone or we may not look (``ns/*`` needs ptrace read access)."""
    try:
        return os.stat(f"{_pid_dir(procfs, pid)}/ns/net").st_ino
    except OSError as exc:
        if exc.errno in _GONE or exc.errno in _DENIED:
            return None
        raise


def _walk_for_socket(
    inode: int,
    procfs: PathLike,
    uid: int | None,
    netns: int | None,
    stats: WalkStats,
) -> int | None:
    target = f"socket:[{inode}]"
    root = os.fspath(procfs)
    for pid in pids(root):
        pdir = f"{root}/{pid}"
        if uid is not None:
            try:
                # st_uid of /proc/<pid> is the euid, or 0 for a non-dumpable process
                # (fs/proc/base.c task_dump_owner): a setuid or prctl(PR_SET_DUMPABLE, 0)
                # process of the user is not found by a uid-restricted walk.
                owner = os.stat(pdir).st_uid
            except (FileNotFoundError, ProcessLookupError):
                stats.vanished += 1  # Race: exited since listdir.
                continue
            if owner != uid:
                stats.filtered += 1
                continue
        if netns is not None:
            try:
                ns = os.stat(f"{pdir}/ns/net").st_ino
            except (FileNotFoundError, ProcessLookupError):
                stats.vanished += 1  # Race: exited since listdir.
                continue
            except PermissionError:
                # ns/* needs ptrace read access: we cannot prove the process is in our
                # namespace, so it does not count.
                stats.denied += 1
                stats.denied_pids.append(pid)
                continue
            if ns != netns:
                stats.filtered += 1
                continue
        fddir = f"{pdir}/fd"
        try:
            names = os.listdir(fddir)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            stats.vanished += 1  # Race: the process exited between the two listdirs.
            continue
        except PermissionError:
            # Another user's fds need CAP_SYS_PTRACE, even as root: skip and count.
            stats.denied += 1
            stats.denied_pids.append(pid)
            continue
        stats.processes += 1
        for name in names:
            try:
                link = os.readlink(f"{fddir}/{name}")
            except (FileNotFoundError, ProcessLookupError):
                continue  # Race: fd closed (or process gone) since listdir.
            except PermissionError:
                # Credentials changed under us (setuid exec): skip the process.
                stats.denied += 1
                stats.denied_pids.append(pid)
                break
            stats.fds += 1
            if link == target:
                return pid
    return None


def find_socket_owner(
    inode: int,
    procfs: PathLike = "/proc",
    *,
    uid: int | None = None,
    netns: int | None = None,
    stats: WalkStats | None = None,
) -> int | None:
    """The lowest pid holding ``socket:[inode]`` among the processes of *procfs*.

    Restricted to processes owned by *uid* (``st_uid`` of ``<procfs>/<pid>``) and to those
    whose ``ns/net`` inode is *netns*, when given: the socket uid from sock_diag narrows a
    walk of every fd (~4.5 us each) to one user's processes. Vanished and forbidden
    processes are skipped; pass *stats* (a :class:`WalkStats`) to learn how many. Several
    processes may share the socket (fork); the first found is returned.
    """
    if inode <= 0:
        return None  # TIME_WAIT and request sockets: no file, no owner.
    return _walk_for_socket(inode, procfs, uid, netns, stats if stats is not None else WalkStats())


def find_socket_owner_all(
    inode: int,
    procfs: PathLike = "/proc",
    netns: int | None = None,
    *,
    stats: WalkStats | None = None,
) -> int | None:
    """The Slurm-style reference walk: every process, every fd (optionally one netns)."""
    return find_socket_owner(inode, procfs, uid=None, netns=netns, stats=stats)


def read_proc_cgroups(pid: int | str, procfs: PathLike = "/proc") -> list[ProcCgroup]:
    """Parse ``<procfs>/<pid>/cgroup``.

    A vanished process raises ProcessLookupError; a malformed line KernelFormatError.
    """
    path = f"{_pid_dir(procfs, pid)}/cgroup"
    text = _read_proc_file(path, pid)
    result: list[ProcCgroup] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        # The path is last and may itself contain ':' (cgroup names are free-form).
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise KernelFormatError(path, lineno, line, "expected ID:CONTROLLERS:PATH")
        hid_text, ctrl_text, cg_path = parts
        if not hid_text.isascii() or not hid_text.isdigit():
            raise KernelFormatError(path, lineno, line, "hierarchy id is not a number")
        if not cg_path.startswith("/"):
            raise KernelFormatError(path, lineno, line, "cgroup path is not absolute")
        controllers = tuple(ctrl_text.split(",")) if ctrl_text else ()
        if "" in controllers:
            raise KernelFormatError(path, lineno, line, "empty controller name")
        hid = int(hid_text)
        if hid == 0 and controllers:
            raise KernelFormatError(path, lineno, line, "hierarchy 0 with controllers")
        result.append(ProcCgroup(hid, controllers, cg_path))
    return result


def proc_start_ticks(pid: int | str, procfs: PathLike = "/proc") -> int:
    """Field 22 of ``<procfs>/<pid>/stat``: start time in clock ticks after boot.

    With the pid, it identifies a process across pid reuse. ``comm`` (field 2) is in
    parentheses and may itself contain spaces and ')', so fields are counted after the
    LAST ')' (fs/proc/array.c ``do_task_stat``).
    """
    path = f"{_pid_dir(procfs, pid)}/stat"
    text = _read_proc_file(path, pid)
    line = text.splitlines()[0] if text else ""
    head, paren, tail = line.rpartition(")")
    if not paren or "(" not in head:
        raise KernelFormatError(path, 1, line, "no '(comm)' field")
    fields = tail.split()
    # tail starts at field 3 (state): field 22 is fields[22 - 3].
    if len(fields) < 20:
        raise KernelFormatError(path, 1, line, "fewer than 22 fields")
    try:
        return int(fields[19])
    except ValueError:
        raise KernelFormatError(path, 1, line, "starttime is not a number") from None


def proc_uid(pid: int | str, procfs: PathLike = "/proc") -> int:
    """The real uid of a process: first value of the ``Uid:`` line of its ``status``."""
    path = f"{_pid_dir(procfs, pid)}/status"
    text = _read_proc_file(path, pid)
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("Uid:"):
            values = line[4:].split()
            if len(values) != 4 or not all(v.isdigit() for v in values):
                raise KernelFormatError(path, lineno, line, "expected 4 uids")
            return int(values[0])
    raise KernelFormatError(path, 0, "", "no Uid: line")
