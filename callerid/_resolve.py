"""Caller ID: from a TCP connection to the job that owns its local end.

The chain, fastest first (each step is tried only when the faster one cannot answer)::

    4-tuple --sock_diag exact lookup--> inode, uid, cgroup v2 id      (~5-20 us)
            --locator: cgroup id--> job                               (done, usually)
            --/proc/*/fd walk of that uid's processes in our netns--> pid
            --/proc/<pid>/cgroup--> locator: cgroup path --> job

and the Slurm-equivalent reference (``resolve_slurm_style``): parse ``/proc/net/tcp{,6}``,
walk every fd of every process, read the pid's cgroups.

Which backend knows the jobs is not this module's business: it asks a :class:`JobLocator`
(``CgroupLayout`` is one; a Slurm backend provides another). Each step is logged at debug
level on the ``callerid`` logger and recorded, with its duration, in the Resolution.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._addr import Connection
from ._diag import DiagSocket, SockDiag
from ._errors import NetlinkUnavailable
from ._procfs import (
    ProcCgroup,
    WalkStats,
    find_socket_owner,
    find_socket_owner_all,
    netns_inode,
    read_proc_cgroups,
)
from ._procnet import TCP_STATE_NAMES, find_in_tables

__all__ = [
    "METHOD_CGROUP_ID",
    "METHOD_FD_WALK",
    "METHOD_NOT_FOUND",
    "METHOD_PROCFS_SCAN",
    "JobLocator",
    "Resolution",
    "Resolver",
    "SocketLookup",
    "Step",
]

_log = logging.getLogger("callerid")

METHOD_CGROUP_ID = "netlink+cgroup-id"
METHOD_FD_WALK = "netlink+fd-walk"
METHOD_PROCFS_SCAN = "procfs-scan"
METHOD_NOT_FOUND = "not-found"


class JobLocator(Protocol):
    """What the resolver needs from a job backend."""

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None: ...

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None: ...


class SocketLookup(Protocol):
    """An exact socket lookup: :class:`SockDiag`, or a fake in tests."""

    def lookup(self, conn: Connection) -> DiagSocket | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a resolution: what was asked, what came back, how long it took."""

    name: str
    detail: str
    micros: float


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of a caller-ID resolution.

    ``uid`` and ``inode`` describe the socket (None if it was not found); ``pid`` is
    filled when the fd walk ran and found the holder; ``method`` is one of
    ``"netlink+cgroup-id"``, ``"netlink+fd-walk"``, ``"procfs-scan"``, ``"not-found"``
    (no such connection). ``job_id`` None means: no job claims this connection.
    """

    connection: Connection
    job_id: str | None
    pid: int | None
    uid: int | None
    inode: int | None
    method: str
    steps: tuple[Step, ...]


class _Steps:
    """Collects Steps, timing each from the previous mark, and logs one line per step."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._t = time.perf_counter_ns()

    def add(self, name: str, detail: str) -> None:
        now = time.perf_counter_ns()
        micros = (now - self._t) / 1000.0
        self._t = now
        self.steps.append(Step(name, detail, micros))
        _log.debug("caller-id %s: %s (%.1f us)", name, detail, micros)

    def freeze(self) -> tuple[Step, ...]:
        return tuple(self.steps)


class Resolver:
    """Resolves connections to jobs; see the module docstring for the chain.

    *procfs* is the procfs root (a fake tree in tests). With *use_netlink* a
    :class:`SockDiag` is opened; if netlink is unavailable, :meth:`resolve` falls back to
    :meth:`resolve_slurm_style` (logged once per process). *diag* injects another
    :class:`SocketLookup` (tests); the Resolver then does not own it and
    :meth:`close` leaves it open. Thread-safe if the locator is.
    """

    _warned_no_netlink = False

    def __init__(
        self,
        locator: JobLocator,
        procfs: str | os.PathLike[str] = "/proc",
        use_netlink: bool = True,
        *,
        diag: SocketLookup | None = None,
    ) -> None:
        self._locator = locator
        self._procfs = os.fspath(procfs)
        self._owns_diag = False
        self._diag: SocketLookup | None = diag
        if diag is None and use_netlink:
            try:
                self._diag = SockDiag()
                self._owns_diag = True
            except NetlinkUnavailable as exc:
                if not Resolver._warned_no_netlink:
                    Resolver._warned_no_netlink = True
                    _log.warning("%s; falling back to /proc/net/tcp scans", exc)
        self._netns: int | None = None

    @property
    def uses_netlink(self) -> bool:
        return self._diag is not None

    def close(self) -> None:
        if self._diag is not None and self._owns_diag:
            self._diag.close()
        self._diag = None

    def _own_netns(self) -> int | None:
        # Our own network namespace, the one sock_diag and /proc/self/net answer for. The
        # fd walk is kept to processes in it: on a host running several nodes as network
        # namespaces sharing one pid namespace (the lab), another node's processes are not
        # this node's callers.
        if self._netns is None:
            self._netns = netns_inode("self", self._procfs)
            if self._netns is None:
                _log.warning(
                    "cannot read %s/self/ns/net: fd walks are not netns-filtered", self._procfs
                )
        return self._netns

    def _job_of_pid(self, pid: int, steps: _Steps) -> str | None:
        try:
            entries = read_proc_cgroups(pid, self._procfs)
        except ProcessLookupError:
            # Race: the process exited after the walk found it. Its socket may live on
            # in another process (fork), but that is a new question.
            steps.add("pid-cgroup", f"pid {pid} exited before its cgroups were read")
            return None
        job = self._locator.job_for_proc_cgroups(entries)
        paths = ", ".join(f"{e.hierarchy_id}:{','.join(e.controllers)}:{e.path}" for e in entries)
        steps.add("pid-cgroup", f"pid {pid} [{paths}] -> job {job}")
        return job

    def resolve(self, conn: Connection, want_pid: bool = False) -> Resolution:
        """Resolve *conn* (local = this host's end) to a job.

        With *want_pid*, the fd walk runs even when the cgroup id already named the job,
        so ``pid`` is filled too (the job stays the one the cgroup id gave).
        """
        if self._diag is None:
            return self.resolve_slurm_style(conn)
        steps = _Steps()
        try:
            sock = self._diag.lookup(conn)
        except OSError as exc:
            steps.add("sock_diag", f"{conn} -> error {exc}; falling back to /proc")
            ref = self.resolve_slurm_style(conn)
            return Resolution(
                ref.connection,
                ref.job_id,
                ref.pid,
                ref.uid,
                ref.inode,
                ref.method,
                steps.freeze() + ref.steps,
            )
        if sock is None:
            steps.add("sock_diag", f"{conn} -> no such connection")
            return Resolution(conn, None, None, None, None, METHOD_NOT_FOUND, steps.freeze())
        steps.add(
            "sock_diag",
            f"{conn} -> inode {sock.inode} uid {sock.uid} cgroup {sock.cgroup_id} "
            f"({TCP_STATE_NAMES.get(sock.state, sock.state)})",
        )
        job: str | None = None
        if sock.cgroup_id is not None:
            job = self._locator.job_for_cgroup_id(sock.cgroup_id)
            steps.add("cgroup-id", f"cgroup {sock.cgroup_id} -> job {job}")
            if job is not None and not want_pid:
                return Resolution(
                    conn, job, None, sock.uid, sock.inode, METHOD_CGROUP_ID, steps.freeze()
                )
        netns = self._own_netns()
        stats = WalkStats()
        pid = find_socket_owner(sock.inode, self._procfs, uid=sock.uid, netns=netns, stats=stats)
        steps.add(
            "fd-walk", f"inode {sock.inode} uid {sock.uid} netns {netns} -> pid {pid} ({stats})"
        )
        if job is not None:
            return Resolution(
                conn, job, pid, sock.uid, sock.inode, METHOD_CGROUP_ID, steps.freeze()
            )
        if pid is not None:
            job = self._job_of_pid(pid, steps)
        return Resolution(conn, job, pid, sock.uid, sock.inode, METHOD_FD_WALK, steps.freeze())

    def resolve_slurm_style(self, conn: Connection) -> Resolution:
        """The reference path, as Slurm does it (plus mapped-address handling): find the
        connection in ``/proc/net/tcp{,6}``, walk every fd of every process (in our netns)
        for its inode, read the holder's cgroups. No netlink, no cgroup id."""
        steps = _Steps()
        sock = find_in_tables(conn, self._procfs)
        if sock is None:
            steps.add("proc-net-tcp", f"{conn} -> no such connection")
            return Resolution(conn, None, None, None, None, METHOD_NOT_FOUND, steps.freeze())
        steps.add(
            "proc-net-tcp",
            f"{conn} -> inode {sock.inode} uid {sock.uid} "
            f"({TCP_STATE_NAMES.get(sock.state, sock.state)})",
        )
        netns = self._own_netns()
        stats = WalkStats()
        pid = find_socket_owner_all(sock.inode, self._procfs, netns, stats=stats)
        steps.add("fd-walk-all", f"inode {sock.inode} netns {netns} -> pid {pid} ({stats})")
        job = self._job_of_pid(pid, steps) if pid is not None else None
        return Resolution(conn, job, pid, sock.uid, sock.inode, METHOD_PROCFS_SCAN, steps.freeze())
