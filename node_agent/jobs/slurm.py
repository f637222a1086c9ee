"""The Slurm backend: Slurm's own jobs on this node, through their slurmstepd sockets.

The agent keeps no job state of its own here. Every question goes to what Slurm keeps on
the node:

- the jobs of the node are the jobs with an extern step socket
  (``<SlurmdSpoolDir>/<NodeName>_<job>.4294967292``), as pam_slurm_adopt counts them;
  their owner is the step's uid (REQUEST_STEP_UID), cached per socket, since neither
  changes while the socket lives; their state is the extern step's (REQUEST_STATE);
- a job's processes are the union of its steps' (REQUEST_STEP_LIST_PIDS), the batch
  step's first;
- adoption is REQUEST_ADD_EXTERN_PID to the extern step: slurmstepd puts the process into
  the step's cgroups through its own plugins, accounts for it and re-adopts its orphans,
  and Slurm signals and kills it with the job. The agent writes nothing of Slurm's;
- caller ID maps a process's cgroup path to its job where the path says so unambiguously
  (node_agent.jobs.slurmconf.job_of_cgroup); otherwise it is unknown;
- "newest" follows the rule of pam_slurm_adopt of the running version
  (slurmconf.newest_rule): the latest mtime of the job's cgroup directory (22.05 on cgroup
  v1), the highest job id (v2), the latest extern socket ctime (26.05+).

Without ``PrologFlags=contain`` there are no extern steps: no job can be joined, which
the agent says at start-up and in every refusal (`why_no_jobs`).

An ssh-to-job session runs in the job's extern step, as ``srun --overlap`` runs in a step
of the job: its launcher is enrolled with REQUEST_ADD_EXTERN_PID before it does anything
(`_SessionProcs`). The clean-up helper of a session whose files had to be made in a job's
own mount namespace runs there too while the job runs; once the job has ended there is no
cgroup outside the job for it (`helper_cgroup`: "not supported") and the directory stays in
the job's view, which Slurm's job_container/tmpfs removes with the job.

Selected with ``backend = "slurm"`` in agent.toml (`open_slurm`).
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from callerid import CgroupError, CgroupLayout, Job, ProcCgroup
from node_agent import jobenv
from node_agent.config import AgentConfig
from node_agent.errors import JobNotFound, NotSupported, StartupError
from node_agent.jobs.base import ENDING, RUNNING, STARTING, JobCgroup, JobRecord
from node_agent.jobs.slurmconf import (
    SlurmNodeConfig,
    StepSocket,
    job_of_cgroup,
    newest_rule,
    probe_slurm_version,
    read_node_config,
    step_sockets,
)
from node_agent.jobs.stepd import Stepd, StepdError, state_name

log = logging.getLogger("node_agent.jobs.slurm")

#: slurmstepd's step states (stepd.state_name) as the agent's job states; any other
#: ("not running", "cancelled", "ending", unknown) counts as ending: nothing joins it.
_STATES = {"starting": STARTING, "running": RUNNING}

STEPD_TIMEOUT = 2.0   # one stepd call; the stepd itself never times out


def _stat(pid: int, procfs: str) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) of a process, from /proc/<pid>/stat; None if gone
    (a zombie too: it has exited, only its parent's wait is missing)."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2:].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        return None
    try:
        return int(fields[1]), int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _kill(pid: int, start: int, procfs: str) -> bool:
    """SIGKILL `pid` if it is still the process that started at `start`."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        st = _stat(pid, procfs)
        if st is None or st[2] != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _SessionProcs:
    """An ssh-to-job session in a Slurm job, as a `JobCgroup`.

    Slurm's cgroups are written only by slurmstepd, so the session gets none of its own:
    its launcher is enrolled into the job's extern step with REQUEST_ADD_EXTERN_PID (as a
    login adopted by pam_slurm_adopt, or a process of ``srun --overlap``), which puts it in
    the step's cgroups, its accounting and its end. The session's processes are then those
    of the extern step (REQUEST_STEP_LIST_PIDS) that descend from the launcher (sshd), and
    those in a process session (setsid) led by one of them -- a shell's ``nohup cmd &``.
    What leaves that tree and session on purpose (a double fork after setsid), or outlives
    both, stays in the extern step and ends with the job, as what an adopted ssh login
    leaves does. With `session` None: all the sessions of the job this agent opened."""

    def __init__(self, jobs: SlurmJobs, job_id: str, session: str | None) -> None:
        self.jobs, self.job_id, self.session = jobs, job_id, session

    def __str__(self) -> str:
        return f"job {self.job_id} " + (f"ssh session {self.session}" if self.session
                                        else "ssh sessions") + " (in the extern step)"

    def create(self) -> list[str]:
        """No file to write (the launcher is enrolled); JobNotFound unless the job has an
        extern step here."""
        if self.jobs.extern_step(self.job_id) is None:
            raise JobNotFound(self.job_id, self.jobs.node)
        return []

    def join(self) -> list[str]:
        """As create, for a session that must be open: CgroupError when it is not."""
        if self.session is None or not self.jobs.session_root(self.job_id, self.session):
            raise CgroupError(f"{self} is gone")
        return self.create()

    def enroll(self, pid: int) -> None:
        """REQUEST_ADD_EXTERN_PID, and `pid` becomes the session's root."""
        if self.session is None:
            raise ValueError("enroll: a session, not all of a job's")
        st = _stat(pid, self.jobs.procfs)
        if st is None:
            raise ProcessLookupError(f"pid {pid} is gone")
        self.jobs.adopt(self.job_id, pid)
        self.jobs.set_session_root(self.job_id, self.session, (pid, st[2]))

    def exists(self) -> bool:
        """Whether any of its processes runs."""
        return bool(self.procs())

    def procs(self) -> set[int]:
        """Its processes (the class docstring)."""
        return set(self._procs())

    def _procs(self) -> dict[int, int]:
        """Its processes and their start times."""
        roots = self.jobs.session_roots(self.job_id, self.session)
        ext = self.jobs.extern_step(self.job_id)
        if not roots or ext is None:
            return {}
        try:
            with Stepd(ext.path, self.jobs.timeout) as s:
                pids = s.pids()
        except (StepdError, OSError) as e:
            log.debug("%s: %s: %s", self, ext.path, e)
            return {}
        stats = {p: st for p in pids if (st := _stat(p, self.jobs.procfs)) is not None}
        children: dict[int, list[int]] = {}
        for p, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(p)
        tree = {pid for pid, start in roots if pid in stats and stats[pid][2] == start}
        todo = list(tree)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in tree:
                    tree.add(child)
                    todo.append(child)
        return {p: st[2] for p, st in stats.items() if p in tree or st[1] in tree}

    def kill(self, timeout: float) -> int:
        """SIGKILL its processes until none is left (bounded by `timeout`); how many.
        Each through a pidfd, once its start time is checked: a pid reused since the
        listing is spared."""
        deadline = time.monotonic() + timeout
        killed: set[tuple[int, int]] = set()
        while found := self._procs():
            killed |= {(pid, start) for pid, start in found.items() if _kill(pid, start,
                                                                              self.jobs.procfs)}
            if time.monotonic() > deadline:
                raise CgroupError(f"{self}: processes left after {timeout:g} s: "
                                  f"{sorted(found)}")
            time.sleep(0.01)
        return len(killed)

    def remove(self) -> None:
        """Forget the session (its processes are killed by `kill`)."""
        self.jobs.set_session_root(self.job_id, self.session, None)


class _NoCgroup:
    """The `JobCgroup` of a backend that cannot make cgroups for the agent: nothing
    exists, nothing can be made ("not supported")."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __str__(self) -> str:
        return self.what

    def create(self) -> list[str]:
        """Refused: Slurm's cgroups are written only through slurmstepd."""
        raise NotSupported(f"{self.what}: the Slurm backend makes no cgroup outside the "
                           "jobs (Slurm's are written only through slurmstepd)")

    def join(self) -> list[str]:
        """Refused, as create()."""
        return self.create()

    def enroll(self, pid: int) -> None:
        """Refused, as create()."""
        self.create()

    def exists(self) -> bool:
        """Never."""
        return False

    def procs(self) -> set[int]:
        """None."""
        return set()

    def kill(self, timeout: float) -> int:
        """Nothing to kill."""
        return 0

    def remove(self) -> None:
        """Nothing to remove."""


class SlurmJobs:
    """The jobs Slurm runs on this node (a `JobBackend`; not a `JobControl`: Slurm
    starts and ends its jobs). Thread-safe: every call opens its own stepd connections."""

    def __init__(self, cfg: SlurmNodeConfig, *, procfs: str = "/proc",
                 timeout: float = STEPD_TIMEOUT, scratch: str | None = None) -> None:
        self.cfg = cfg
        self._scratch = scratch
        self.node = cfg.nodename
        self.procfs = procfs
        self.timeout = timeout
        self._uids: dict[tuple[str, int], int] = {}   # (socket path, its inode) -> uid
        # (job, session id) -> (pid, start time) of the session's launcher (sshd)
        self._sessions: dict[tuple[str, str], tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._warned_spool = False
        try:
            self.rule = newest_rule(cfg.version, cfg.cgroup_plugin)
        except ValueError as e:   # CgroupPlugin=disabled, or no cgroup to detect
            log.warning("Slurm backend: %s; \"newest\" is the latest extern step", e)
            self.rule = "ctime"

    # -- what the spool dir and the stepds say ----------------------------------------------
    def _steps(self) -> dict[int, list[StepSocket]]:
        by_job: dict[int, list[StepSocket]] = {}
        spool = self.cfg.spool_dir
        try:
            st = os.stat(spool)
            sockets = step_sockets(spool, self.node)
        except OSError as e:
            # As pam_slurm_adopt: no spool dir (slurmd never ran here) means no jobs.
            log.debug("no Slurm jobs: cannot list %s: %s", spool, e)
            return by_job
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            # Whoever can create a socket there can claim a job of anyone: trust none.
            if not self._warned_spool:
                log.error("Slurm backend: %s is not root's alone (owner uid %d, mode %o): "
                          "its sockets are not trusted, no job is seen", spool, st.st_uid,
                          st.st_mode & 0o7777)
                self._warned_spool = True
            return by_job
        for s in sockets:
            by_job.setdefault(s.job_id, []).append(s)
        with self._lock:   # forget the owners of sockets that are gone
            listed = {s.path for s in sockets}
            for key in [k for k in self._uids if k[0] not in listed]:
                del self._uids[key]
        return by_job

    def _uid(self, sock: StepSocket) -> int:
        ino = os.stat(sock.path).st_ino
        with self._lock:
            uid = self._uids.get((sock.path, ino))
        if uid is None:
            with Stepd(sock.path, self.timeout) as s:
                uid = s.uid()
            with self._lock:
                self._uids[(sock.path, ino)] = uid
        return uid

    def _record(self, job_id: int, steps: Sequence[StepSocket]) -> JobRecord | None:
        ext = next((s for s in steps if s.is_extern), None)
        if ext is None:
            return None   # no extern step: nothing can be joined (PrologFlags=contain)
        try:
            uid = self._uid(ext)
            with Stepd(ext.path, self.timeout) as s:
                state = _STATES.get(state_name(s.version, s.state()), ENDING)
            ctime = os.stat(ext.path).st_ctime
        except (StepdError, OSError) as e:
            # Race: the job ended since the listing (its sockets go with it).
            log.debug("job %d: extern step %s: %s", job_id, ext.path, e)
            return None
        try:
            pw = pwd.getpwuid(uid)
            user, gid = pw.pw_name, pw.pw_gid
        except KeyError:
            user, gid = str(uid), uid
        return JobRecord(Job(str(job_id), user, uid, gid, ctime), state)

    def why_no_jobs(self) -> str:
        """Why no job of this node can be joined, or "" (PrologFlags=contain missing)."""
        if self.cfg.prolog_contain:
            return ""
        return (f"slurm.conf has no PrologFlags=contain: Slurm makes no extern step, "
                f"so no ssh login can join a job on {self.node}")

    # -- JobBackend --------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        """One Slurm job of this node (with an extern step), or None."""
        if not job_id.isdigit():
            return None
        steps = self._steps().get(int(job_id))
        return self._record(int(job_id), steps) if steps else None

    def list_jobs(self, user: str | None = None) -> list[JobRecord]:
        """The Slurm jobs of this node with an extern step (of `user` only, when
        given), oldest first."""
        recs = [r for job_id, steps in sorted(self._steps().items())
                if (r := self._record(job_id, steps)) is not None]
        return sorted((r for r in recs if user is None or r.job.user == user),
                      key=lambda r: (r.job.start_time, int(r.job.id)))

    def _job_steps(self, job_id: str) -> list[StepSocket]:
        if not job_id.isdigit():
            return []
        steps = self._steps().get(int(job_id), [])
        # the batch step first (it holds the job script), then the others, extern last
        return sorted(steps, key=lambda s: (not s.is_batch, s.is_extern, s.step_id))

    def pids(self, job_id: str) -> list[int]:
        """Every step's processes, the batch step's first."""
        out: list[int] = []
        for step in self._job_steps(job_id):
            try:
                with Stepd(step.path, self.timeout) as s:
                    out += [p for p in s.pids() if p not in out]
            except StepdError as e:
                log.debug("job %s: %s: %s", job_id, step.path, e)
        return out

    def main_pid(self, job_id: str) -> int | None:
        """The first process of the job that is not an sshd (sshd rewrites its own
        /proc environ; an adopted login's sshd sits in the extern step)."""
        for pid in self.pids(job_id):
            try:
                comm = Path(f"{self.procfs}/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm != "sshd":
                return pid
        return None

    def environment(self, job_id: str) -> dict[str, str]:
        """The environment of the job's main process, with SLURM_JOB_ID set."""
        main = self.main_pid(job_id)
        env = jobenv.read_environ(main, self.procfs) if main is not None else {}
        env.setdefault("SLURM_JOB_ID", job_id)
        return env

    def cgroup_names(self, job_id: str) -> list[str]:
        """The cgroups of the job's first process, as /proc/<pid>/cgroup shows them."""
        for pid in self.pids(job_id):
            try:
                lines = Path(f"{self.procfs}/{pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            return [f"{parts[1] or 'unified'}:{parts[2]}" for line in lines
                    if len(parts := line.split(":", 2)) == 3
                    and job_of_cgroup(parts[2], self.cfg) == int(job_id)]
        return []

    def newest(self, records: Sequence[JobRecord]) -> JobRecord:
        """pam_slurm_adopt's "newest" of the running version (module docstring)."""
        if self.rule == "jobid":
            return max(records, key=lambda r: int(r.job.id))
        if self.rule == "mtime":
            return max(records, key=lambda r: (self._job_dir_mtime(r), int(r.job.id)))
        return max(records, key=lambda r: (r.job.start_time, int(r.job.id)))

    def _job_dir_mtime(self, rec: JobRecord) -> float:
        """The latest mtime of the job's v1 cgroup directory over the hierarchies Slurm
        uses (it moves whenever a step's cgroup is made or removed); 0 when unreadable."""
        best = 0.0
        # "/slurm", or "/slurm_<node>" in a build for several slurmd per host (Debian's
        # packages use it whatever slurm.conf says): whichever exists.
        for prepend in {self.cfg.cgroup_prepend.strip("/"), f"slurm_{self.node}"}:
            for ctrl in ("memory", "cpuset", "devices", "freezer"):
                d = Path(self.cfg.cgroup_mountpoint, ctrl, prepend, f"uid_{rec.job.uid}",
                         f"job_{rec.job.id}")
                try:
                    best = max(best, d.stat().st_mtime)
                except OSError:
                    continue
        return best

    def adopt(self, job_id: str, pid: int) -> None:
        """REQUEST_ADD_EXTERN_PID to the job's extern step."""
        ext = self.extern_step(job_id)
        if ext is None:
            raise ValueError(f"job {job_id} has no extern step on {self.node}"
                              + (f" ({self.why_no_jobs()})" if self.why_no_jobs() else ""))
        with Stepd(ext.path, self.timeout) as s:
            s.add_extern_pid(pid)

    def session_cgroup(self, job_id: str, session: str | None = None) -> JobCgroup:
        """An ssh-to-job session's processes in the job's extern step (`_SessionProcs`)."""
        return _SessionProcs(self, job_id, session)

    def extern_step(self, job_id: str) -> StepSocket | None:
        """The job's extern step here, or None."""
        return next((s for s in self._job_steps(job_id) if s.is_extern), None)

    def session_roots(self, job_id: str, session: str | None) -> list[tuple[int, int]]:
        """(pid, start time) of the launchers of the job's sessions (or of one)."""
        with self._lock:
            return [root for (job, sid), root in self._sessions.items()
                    if job == job_id and session in (None, sid)]

    def session_root(self, job_id: str, session: str) -> tuple[int, int] | None:
        """(pid, start time) of one session's launcher, or None."""
        with self._lock:
            return self._sessions.get((job_id, session))

    def set_session_root(self, job_id: str, session: str | None,
                         root: tuple[int, int] | None) -> None:
        """Record a session's launcher (or forget it, or all the job's, with None)."""
        with self._lock:
            for key in [k for k in self._sessions if k[0] == job_id
                        and session in (None, k[1])]:
                del self._sessions[key]
            if root is not None and session is not None:
                self._sessions[(job_id, session)] = root

    def helper_cgroup(self, name: str) -> JobCgroup:
        """None outside the jobs (module docstring)."""
        return _NoCgroup(f"helper {name}")

    def leftover_helper_cgroups(self) -> list[JobCgroup]:
        """None: this backend makes no cgroups."""
        return []

    def scratch_cgroups(self) -> str | None:
        """The agent's own cgroup directory ([cgroup] subtree in its first hierarchy),
        never one of Slurm's: the warm-up pre-pays the kernel's migration toll there
        before slurmstepd moves a login (the kernel's lock is global), or None."""
        return self._scratch

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        """Unknown here: the resolver then reads the owning process's cgroups."""
        return None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        """The job a process's cgroup paths name, when it runs on this node."""
        for e in entries:
            job = job_of_cgroup(e.path, self.cfg)
            if job is not None:
                return str(job) if self._steps().get(job) else None
        return None

    def close(self) -> None:
        """Nothing to release: connections are per call."""

    def namespaces(self, job_id: str) -> list[tuple[str, int]]:
        """The job's namespaces from its extern step's stepd (REQUEST_GET_NS_FD before
        25.11: the mount namespace of job_container/tmpfs; REQUEST_GET_NS_FDS from 25.11),
        those that differ from the agent's own, in jobenv.JOIN_KINDS order; "user" and
        kinds the agent does not know are closed and left out. With no job container
        plugin (job_container/none) the stepd sends no fd: an empty list. StepdError (an
        OSError) when the stepd cannot be asked, as pam_slurm_adopt's "stepd_get_ns_fd
        failed", which it treats as an adoption failure."""
        ext = self.extern_step(job_id)
        if ext is None:
            raise ProcessLookupError(f"job {job_id} has no extern step on {self.node}")
        with Stepd(ext.path, self.timeout) as s:
            typed = s.ns_fds_typed()
        kept: dict[str, int] = {}
        pending = list(typed)
        try:
            while pending:
                flag, fd = pending[0]
                kind = jobenv.KIND_OF_FLAG.get(flag, "")
                keep = kind in jobenv.JOIN_KINDS and kind not in kept and \
                    jobenv.differs(fd, kind, self.procfs)
                pending.pop(0)
                if keep:
                    kept[kind] = fd
                else:
                    os.close(fd)
        except BaseException:   # each fd closed once: a closed number may be reused
            jobenv.close_all(pending)
            jobenv.close_all(list(kept.items()))
            raise
        return [(kind, kept[kind]) for kind in jobenv.JOIN_KINDS if kind in kept]


def open_slurm(config: AgentConfig) -> SlurmJobs:
    """The Slurm backend of `config` ([slurm]): this node's facts read from slurm.conf
    (and cgroup.conf), Slurm's version from `slurmd -V`; StartupError when slurm.conf
    cannot be read or names no node for this host."""
    sc = config.slurm
    version = probe_slurm_version()
    try:
        cfg = read_node_config(sc.slurm_conf, sc.nodename or None, version=version)
    except (OSError, ValueError) as e:
        raise StartupError(f"Slurm backend: {e}") from None
    if sc.spool_dir:
        cfg = replace(cfg, spool_dir=sc.spool_dir)
    try:
        own = CgroupLayout.discover(config.cgroup, procfs=config.procfs)  # the agent's
        scratch = str(own.subtree_path(own.hierarchies[0])) if own.hierarchies else None
    except Exception as e:   # the warm-up is an optimisation: go on without it
        log.warning("Slurm backend: no cgroup of the agent's own for the warm-up: %s", e)
        scratch = None
    jobs = SlurmJobs(cfg, procfs=config.procfs, scratch=scratch)
    log.info("Slurm backend: node %s, spool dir %s, Slurm %s, %s, \"newest\" by %s",
             cfg.nodename, cfg.spool_dir,
             ".".join(f"{n:02d}" if i else str(n) for i, n in enumerate(version))
             if version else "(version unknown)", cfg.cgroup_plugin, jobs.rule)
    return jobs
