"""What the agent needs from a job backend: the `JobBackend` protocol and its types.

A backend is where the jobs of this node come from: the native registry (node_agent.jobs.
native), and later a scheduler's own jobs (Slurm's stepds). The daemon (admission,
ssh-to-job sessions, the gRPC service, caller ID) uses only what is declared here, so that
adding a backend is adding one module; how a backend keeps its jobs (its database, the
cgroup layout of its jobs, a scheduler's sockets) stays inside it.

Errors: a backend raises the shared catalog's errors (node_agent.errors: JobNotFound,
JobNotRunning, ...) for what a caller may be told, and callerid.CgroupError (an OSError)
when a cgroup operation fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from callerid import Job, ProcCgroup

#: A job's states, as every backend reports them.
STARTING, RUNNING, ENDING = "starting", "running", "ending"


@dataclass(frozen=True)
class JobRecord:
    """A job of this node as the backend knows it now."""

    job: Job
    state: str              # STARTING, RUNNING or ENDING
    main_start: int | None = None   # the main process's start time (clock ticks), if known


class JobCgroup(Protocol):
    """One cgroup (a directory in every hierarchy the backend uses) that the agent runs
    processes in: an ssh-to-job session's leaf inside a job, or a helper's cgroup outside
    any job. `str()` names it for logs.

    A process gets in in two steps: the launcher writes its pid to the ``cgroup.procs``
    files that `create` or `join` return, then the agent calls `enroll` with its pid while
    it waits (node_agent.spawn). A backend whose cgroups only the scheduler writes returns
    no files and enrolls through the scheduler (Slurm: into the job's extern step, the
    "cgroup" then being the session's processes there); the others enroll nothing."""

    def create(self) -> list[str]:
        """Make it (idempotent) and return the ``cgroup.procs`` files a process writes its
        pid to, to join it. JobNotFound when the job is gone; CgroupError otherwise."""
        ...

    def join(self) -> list[str]:
        """The ``cgroup.procs`` files of a cgroup that must already exist; CgroupError
        when it is gone."""
        ...

    def enroll(self, pid: int) -> None:
        """Put `pid`, a held launcher that joined the files above, in (see the class
        docstring); raises (OSError, ValueError) when it cannot."""
        ...

    def exists(self) -> bool:
        """Whether it exists in any hierarchy."""
        ...

    def procs(self) -> set[int]:
        """The pids in it and below (an empty set when it does not exist)."""
        ...

    def kill(self, timeout: float) -> int:
        """SIGKILL everything in it and below until empty; how many were killed."""
        ...

    def remove(self) -> None:
        """Remove it (and what is below) once empty; nothing when already gone."""
        ...


class JobBackend(Protocol):
    """The jobs of this node, as the agent needs them. Thread-safe."""

    #: This node's name, as the backend's jobs know it.
    node: str

    # -- jobs ----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        """One job of this node, or None."""
        ...

    def list_jobs(self, user: str | None = None) -> list[JobRecord]:
        """The jobs of this node (of `user` only, when given), oldest first."""
        ...

    def pids(self, job_id: str) -> list[int]:
        """The job's processes here, its main process first."""
        ...

    def main_pid(self, job_id: str) -> int | None:
        """The job process whose environment, working directory and namespaces an
        ssh-to-job session takes (not one of the sessions' own), or None."""
        ...

    def environment(self, job_id: str) -> dict[str, str]:
        """The job's environment (OSError when it cannot be read)."""
        ...

    def cgroup_names(self, job_id: str) -> list[str]:
        """``hierarchy:path`` of each of the job's cgroups, for display."""
        ...

    def newest(self, records: Sequence[JobRecord]) -> JobRecord:
        """Which of these jobs (a user's, at least one) is the "newest" that
        pam_adopt's `action_unknown=newest` adopts into: the scheduler's own rule, so that
        a login lands where the scheduler's PAM module would put it."""
        ...

    def why_no_jobs(self) -> str:
        """Why no job of this node can ever be joined (a scheduler's configuration that
        rules it out), or "": said at start-up and in every "no jobs" refusal."""
        ...

    # -- changes the agent makes -----------------------------------------------------------
    def adopt(self, job_id: str, pid: int) -> None:
        """Put `pid` (an ssh login's process) into the job, so that its limits,
        accounting and end apply to it. Raises (OSError, ValueError) on failure."""
        ...

    def session_cgroup(self, job_id: str, session: str | None = None) -> JobCgroup:
        """The cgroup of one ssh-to-job session inside the job, or with `session` None
        the one that holds all of the job's sessions."""
        ...

    def helper_cgroup(self, name: str) -> JobCgroup:
        """A transient cgroup outside every job for one of the agent's helpers (the
        clean-up of a session whose job has ended): made, used and removed by the caller."""
        ...

    def leftover_helper_cgroups(self) -> list[JobCgroup]:
        """Helper cgroups that an earlier run of the agent left (a crash), to remove."""
        ...

    def scratch_cgroups(self) -> str | None:
        """A directory of the agent's own in the first cgroup hierarchy, for its
        migration warm-up (node_agent.agent.warmup), or None when there is none."""
        ...

    # -- callerid.JobLocator: a socket's cgroup or a process's cgroups -> the job ------------
    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        """The job whose cgroup (v2) has this id, or None."""
        ...

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        """The job a process is in, from its /proc/<pid>/cgroup entries, or None."""
        ...

    def close(self) -> None:
        """Stop the backend's threads and release what it holds."""
        ...

    # -- what an adopted login joins ---------------------------------------------------------
    def namespaces(self, job_id: str) -> list[tuple[str, int]]:
        """The job's namespaces that differ from the agent's own, as (kind, fd) pairs in
        the order to enter them (node_agent.jobenv.JOIN_KINDS: "mnt", "net", ...; never
        "user"). The fds are open close-on-exec and the caller closes them. An empty list
        when the job has no namespace of its own (or no process to take them from).
        Raises OSError (ProcessLookupError when the job's process went away meanwhile)
        when the job's namespaces cannot be had."""
        ...


@runtime_checkable
class JobControl(Protocol):
    """A backend that starts and ends jobs itself on request (`adoptctl job run/attach/
    end`): the native registry. A scheduler's backend leaves that to the scheduler."""

    def start(self, job_id: str, user: str, argv: Sequence[str] = (), *, cwd: str = "",
              env: Mapping[str, str] | None = None, output: str = "") -> JobRecord:
        """Register a job, make its cgroups and, when argv is given, start its main
        process as the user."""
        ...

    def attach(self, job_id: str, pid: int) -> JobRecord:
        """Move a running process into the job."""
        ...

    def end(self, job_id: str, timeout: float = 10.0) -> tuple[JobRecord, int]:
        """Kill every process of the job and forget it; (its record, processes killed)."""
        ...
