"""What a job's processes share beyond their cgroups: the environment variables
callerid-adopt gives them (named in one place), and the job's namespaces that an ssh-to-job
session or an adopted login enters.

A job's main command (the native registry), a login adopted into a job and an ssh-to-job
session all get them. pam_adopt names none of them itself: it exports what the agent's
reply lists (`env=NAME=VALUE`, node_agent/pamcontract.py) with pam_putenv.
tests/unit/test_jobenv.py checks that every `CALLERID_...` name written anywhere in the
repository is one of these (or one of the few that are not a job's).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

JOB_ID = "CALLERID_JOB_ID"       # the job the process belongs to
NODE = "CALLERID_NODE"           # the node's name, as the agent knows it
JOB_PIDS = "CALLERID_JOB_PIDS"   # ssh-to-job: the job's processes, main one first
NAMES = (JOB_ID, NODE, JOB_PIDS)


def of_job(job_id: str, node: str) -> dict[str, str]:
    """What a job's main command and an adopted login get."""
    return {JOB_ID: job_id, NODE: node}


def read_environ(pid: int, procfs: str = "/proc") -> dict[str, str]:
    """A process's environment from ``<procfs>/<pid>/environ`` (OSError if unreadable)."""
    with open(f"{procfs}/{pid}/environ", "rb") as f:
        raw = f.read()
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


# -- the job's namespaces ------------------------------------------------------------------

#: What an ssh-to-job session's launcher enters (nsenter, by path), in that order: mnt last,
#: since paths change after it (node_agent/agent/sessions.py).
NAMESPACES = ("net", "pid", "mnt")

#: What an adopted login joins (pam_adopt, given the fds over the admission socket), in
#: the order it enters them: nsenter's order, without "user". Never "user": the module
#: runs as root in sshd's privileged process, and entering a user namespace (where root
#: of the node is nobody) would take its capabilities over the node away while sshd still
#: has privileged work to do for the login (the pty, the switch to the user, audit). The
#: job's other namespaces can be entered from outside their user namespace: root has
#: every capability in the user namespaces below its own. The fds are open before the
#: first setns, so entering mnt changes no path used after it.
JOIN_KINDS = ("cgroup", "ipc", "uts", "net", "pid", "mnt", "time")

#: <sched.h> CLONE_NEW* flag of each kind: Slurm's REQUEST_GET_NS_FDS (25.11+) names
#: its fds by them, and setns() checks with them that an fd is the kind it claims.
CLONE_FLAGS = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000,
               "ipc": 0x08000000, "user": 0x10000000, "pid": 0x20000000,
               "net": 0x40000000, "time": 0x00000080}
KIND_OF_FLAG = {flag: kind for kind, flag in CLONE_FLAGS.items()}


def _ns_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def namespaces_to_enter(pid: int, procfs: str = "/proc") -> list[str]:
    """``<procfs>/<pid>/ns/<kind>`` for each of mnt/pid/net where *pid* is in another
    namespace than the agent (compared by (st_dev, st_ino), as nsfs inodes are)."""
    out = []
    for kind in NAMESPACES:
        theirs = f"{procfs}/{pid}/ns/{kind}"
        try:
            a, b = os.stat(theirs), os.stat(f"{procfs}/self/ns/{kind}")
        except OSError:
            continue
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            out.append(theirs)
    return out


def own_namespace(kind: str, procfs: str = "/proc") -> tuple[int, int] | None:
    """(st_dev, st_ino) of the caller's namespace of `kind`, or None when the kernel has
    no such namespace."""
    try:
        return _ns_id(os.stat(f"{procfs}/self/ns/{kind}"))
    except OSError:
        return None


def differs(fd: int, kind: str, procfs: str = "/proc") -> bool:
    """Whether the namespace open at `fd` is not the caller's own of `kind`."""
    return _ns_id(os.fstat(fd)) != own_namespace(kind, procfs)


def close_all(fds: Iterable[tuple[object, int]]) -> None:
    """Close the fds of (kind, fd) pairs (each once, whatever fails)."""
    for _kind, fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def open_namespaces(pid: int, procfs: str = "/proc",
                    kinds: tuple[str, ...] = JOIN_KINDS) -> list[tuple[str, int]]:
    """(kind, fd) of each namespace of `kinds` that *pid* is in and the caller is not, in
    the order of `kinds`; the fds are opened close-on-exec (the agent starts helpers at any
    time, which must not inherit them) and the caller closes them.

    Whether *pid* is still the process meant is the caller's to check after this (pid
    reuse): these fds are of whatever process has the pid while they are opened.
    ProcessLookupError when *pid* does not exist; a kind the kernel lacks is skipped."""
    got: list[tuple[str, int]] = []
    try:
        for kind in kinds:
            mine = own_namespace(kind, procfs)
            path = f"{procfs}/{pid}/ns/{kind}"
            try:
                if _ns_id(os.stat(path)) == mine:
                    continue    # most logins: a stat each, nothing opened
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not os.path.exists(f"{procfs}/{pid}"):
                    raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
                continue        # this kernel has no namespace of that kind
            # Race: the process may have entered another namespace between the stat and
            # the open: the fd is what counts.
            if _ns_id(os.fstat(fd)) == mine:
                os.close(fd)
                continue
            got.append((kind, fd))
    except BaseException:
        close_all(got)
        raise
    return got
