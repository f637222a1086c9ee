"""The native job registry: the embedded default job backend.

A job is an id, a user, the cgroups this agent creates for it (one per configured
hierarchy, `<mount>/<subtree>/job_<id>/`, processes only in the leaf `main/`), a start
time and, for `adoptctl job run`, a main process. Records live in SQLite under the state
directory, written *before* the cgroups are made, so a crash at any point leaves a
record that `recover()` can reconcile with the cgroup tree at the next start:

- a record whose cgroups hold processes is a live job, whatever happened to the agent;
- a record whose main process is gone (or was replaced: the start time is checked, so a
  recycled pid does not count) ends the job;
- a job directory without a record (cannot happen in normal operation) is logged and, when
  empty, removed; one that still holds processes is re-registered as owned by the uid of
  its processes, so nothing runs unaccounted.

When a job's main process exits the job ends: every remaining process in its cgroups
(adopted ssh sessions included) is killed and the cgroups are removed, as a batch
scheduler ends a job when its batch script exits. `end()` does the same on request.
"""

from __future__ import annotations

import logging
import os
import pwd
import select
import sqlite3
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import callerid
from callerid import CgroupLayout, Job, ProcCgroup
from node_agent import spawn
from node_agent.errors import InvalidRequest, JobExists, JobNotFound, JobStartFailed

log = logging.getLogger("node_agent.registry")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    uid         INTEGER NOT NULL,
    gid         INTEGER NOT NULL,
    start_time  REAL NOT NULL,
    main_pid    INTEGER,
    main_start  INTEGER,   -- /proc/<pid>/stat starttime, to tell a recycled pid apart
    state       TEXT NOT NULL
)
"""



@dataclass(frozen=True)
class JobRecord:
    job: Job
    state: str              # "starting", "running", "ending"
    main_start: int | None = None


class JobRegistry:
    """Jobs of this node; thread-safe. Also the `callerid.JobLocator` for this node."""

    def __init__(self, state_dir: str | os.PathLike[str], layout: CgroupLayout, *,
                 node: str, procfs: str = "/proc") -> None:
        self.layout = layout
        self.node = node
        self.procfs = procfs
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(Path(state_dir) / "jobs.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.RLock()
        self._jobs: dict[str, JobRecord] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._finishing: dict[str, threading.Event] = {}
        self._watch_fds: dict[int, tuple[str, int]] = {}   # pidfd -> (job id, pid)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="job-watcher", daemon=True)

    # -- persistence -------------------------------------------------------------------
    def _save(self, rec: JobRecord) -> None:
        j = rec.job
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?)",
                (j.id, j.user, j.uid, j.gid, j.start_time, j.main_pid, rec.main_start, rec.state),
            )
            self._jobs[j.id] = rec

    def _delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._jobs.pop(job_id, None)

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> None:
        """Load the records and reconcile them with the cgroup tree (see module doc)."""
        rows = self._db.execute(
            "SELECT id, user, uid, gid, start_time, main_pid, main_start, state FROM jobs"
        ).fetchall()
        on_disk = self.layout.existing_jobs()
        for jid, user, uid, gid, start, main_pid, main_start, state in rows:
            rec = JobRecord(Job(jid, user, uid, gid, start, main_pid), state, main_start)
            procs = self.layout.procs(jid) if jid in on_disk else set()
            if main_pid and not self._same_process(main_pid, main_start):
                log.info("recover: job %s: main process %d is gone; ending the job", jid, main_pid)
                self._jobs[jid] = rec
                self._finish(jid, reason="main process exited while the agent was down")
                continue
            if jid not in on_disk:
                if state == "starting":
                    log.info("recover: job %s never got its cgroups; dropping it", jid)
                else:
                    log.warning("recover: job %s lost its cgroups (removed behind the agent's "
                                "back); dropping it", jid)
                self._delete(jid)
                continue
            if state == "starting" and not procs:
                log.info("recover: job %s did not finish starting; cleaning up", jid)
                self._jobs[jid] = rec
                self._finish(jid, reason="interrupted start")
                continue
            if state == "ending":
                log.info("recover: job %s was ending; finishing that", jid)
                self._jobs[jid] = rec
                self._finish(jid, reason="interrupted end")
                continue
            self._jobs[jid] = rec
            if main_pid:
                self._watch_pid(jid, main_pid)
            log.info("recover: job %s of %s: %d processes, main pid %s", jid, user,
                     len(procs), main_pid or "-")
        for jid in sorted(on_disk - {r[0] for r in rows}):
            procs = self.layout.procs(jid)
            if not procs:
                log.warning("recover: removing empty cgroups of unknown job %s", jid)
                self.layout.remove(jid)
                continue
            uid = self._uid_of(min(procs))
            try:
                pw = pwd.getpwuid(uid)
                user, gid = pw.pw_name, pw.pw_gid
            except KeyError:
                user, gid = str(uid), uid
            log.warning("recover: cgroups of job %s hold %d processes but no record; "
                        "re-registering it for %s", jid, len(procs), user)
            self._save(JobRecord(Job(jid, user, uid, gid, time.time(), None), "running"))

    def start_watcher(self) -> None:
        self._watcher.start()

    def _uid_of(self, pid: int) -> int:
        try:
            return callerid.proc_uid(pid, self.procfs)
        except (OSError, ValueError):
            return 0

    def _same_process(self, pid: int, start: int | None) -> bool:
        try:
            return start is None or callerid.proc_start_ticks(pid, self.procfs) == start
        except (OSError, ValueError):
            return False

    # -- queries -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list_jobs(self, user: str | None = None) -> list[JobRecord]:
        with self._lock:
            recs = list(self._jobs.values())
        return sorted((r for r in recs if user is None or r.job.user == user),
                      key=lambda r: (r.job.start_time, r.job.id))

    def pids(self, job_id: str) -> list[int]:
        rec = self.get(job_id)
        procs = self.layout.procs(job_id)
        main = rec.job.main_pid if rec else None
        return ([main] if main in procs else []) + sorted(procs - {main})

    def cgroup_names(self, job_id: str) -> list[str]:
        return [f"{h.name}:{self.layout.job_path(h, job_id)}" for h in self.layout.hierarchies]

    # JobLocator: only jobs this registry knows count, whatever directories exist.
    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        jid = self.layout.job_for_cgroup_id(cgroup_id)
        return jid if jid is not None and jid in self._jobs else None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        jid = self.layout.job_for_proc_cgroups(entries)
        return jid if jid is not None and jid in self._jobs else None

    # -- changes -------------------------------------------------------------------------
    def start(self, job_id: str, user: str, argv: Sequence[str] = (), *, cwd: str = "",
              env: Mapping[str, str] | None = None, output: str = "") -> JobRecord:
        """Register a job, create its cgroups and, when argv is given, start its main process."""
        callerid.validate_job_id(job_id)
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise InvalidRequest(f"unknown user {user!r} on {self.node}") from None
        for var in (env or {}):
            if not var or "=" in var or "\0" in var:
                raise InvalidRequest(f"invalid environment variable name {var!r}")
        with self._lock:
            if job_id in self._jobs:
                raise JobExists(job_id, self.node)
            rec = JobRecord(Job(job_id, user, pw.pw_uid, pw.pw_gid, time.time(), None),
                            "starting")
            self._save(rec)
        try:
            self.layout.create_job(job_id)
            if argv:
                pid, start = self._spawn(rec.job, pw, list(argv), cwd or pw.pw_dir,
                                         dict(env or {}), output or os.devnull)
                rec = replace(rec, job=replace(rec.job, main_pid=pid), main_start=start)
            rec = replace(rec, state="running")
            self._save(rec)
        except BaseException:
            log.exception("job %s: start failed; cleaning up", job_id)
            self._finish(job_id, reason="start failed")
            raise
        if rec.job.main_pid:
            self._watch_pid(job_id, rec.job.main_pid)
        log.info("job %s of %s started on %s: main pid %s, cgroups %s", job_id, user, self.node,
                 rec.job.main_pid or "-", ", ".join(self.cgroup_names(job_id)))
        return rec

    def _spawn(self, job: Job, pw: pwd.struct_passwd, argv: list[str], cwd: str,
               extra_env: dict[str, str], output: str) -> tuple[int, int | None]:
        env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "PATH": spawn.LOGIN_PATH,
            "CALLERID_JOB_ID": job.id, "CALLERID_NODE": self.node,
        }
        env.update(extra_env)
        spec = {
            "cgroup_procs": [str(self.layout.leaf_path(h, job.id) / "cgroup.procs")
                             for h in self.layout.hierarchies],
            "uid": pw.pw_uid, "gid": pw.pw_gid,
            "groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
            "cwd": cwd, "argv": argv, "env": env, "output": output,
        }
        try:
            proc = spawn.start(spec)
        except spawn.LaunchError as e:
            raise JobStartFailed(
                f"job {job.id}: cannot start {argv[0]!r} as {pw.pw_name}: {e}") from None
        self._children[proc.pid] = proc
        try:
            start: int | None = callerid.proc_start_ticks(proc.pid, self.procfs)
        except (OSError, ValueError):
            start = None  # already gone: the watcher ends the job
        return proc.pid, start

    def attach(self, job_id: str, pid: int) -> JobRecord:
        rec = self.get(job_id)
        if rec is None:
            raise JobNotFound(job_id, self.node)
        if pid <= 1 or not os.path.exists(f"{self.procfs}/{pid}"):
            raise InvalidRequest(f"no process {pid} on {self.node}")
        self.layout.attach(job_id, pid)
        log.info("job %s: attached pid %d", job_id, pid)
        return rec

    def end(self, job_id: str, timeout: float = 10.0) -> tuple[JobRecord, int]:
        rec = self.get(job_id)
        if rec is None:
            raise JobNotFound(job_id, self.node)
        killed = self._finish(job_id, reason="ended on request", timeout=timeout)
        return rec, killed

    def _finish(self, job_id: str, *, reason: str, timeout: float = 10.0) -> int:
        """Kill what is left in the job, remove its cgroups, forget it. Idempotent, and
        one at a time per job: ending a job kills its main process, whose exit the
        watcher reports while the first _finish is still running; the second caller
        waits for the first instead of racing it over the same cgroups."""
        with self._lock:
            running = self._finishing.get(job_id)
            if running is None:
                self._finishing[job_id] = threading.Event()
        if running is not None:
            running.wait(timeout + 5)
            return 0
        try:
            return self._finish_once(job_id, reason, timeout)
        finally:
            with self._lock:
                self._finishing.pop(job_id).set()

    def _finish_once(self, job_id: str, reason: str, timeout: float) -> int:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is not None and rec.state != "ending":
                self._save(replace(rec, state="ending"))
        killed = 0
        if job_id in self.layout.existing_jobs():
            killed = self.layout.kill(job_id, timeout=timeout)
            self.layout.remove(job_id)
        if rec and rec.job.main_pid:
            child = self._children.pop(rec.job.main_pid, None)
            if child is not None:
                child.wait()
        self._delete(job_id)
        log.info("job %s ended on %s (%s): %d processes killed", job_id, self.node, reason, killed)
        return killed

    # -- main-process watcher ----------------------------------------------------------
    def _watch_pid(self, job_id: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._finish_async(job_id, f"main process {pid} exited")
            return
        with self._lock:
            self._watch_fds[fd] = (job_id, pid)
        os.write(self._wake_w, b"x")

    def _finish_async(self, job_id: str, reason: str) -> None:
        threading.Thread(target=self._finish_quietly, args=(job_id, reason),
                         name=f"end-{job_id}", daemon=True).start()

    def _finish_quietly(self, job_id: str, reason: str) -> None:
        try:
            if self.get(job_id) is not None:
                self._finish(job_id, reason=reason)
        except Exception:
            log.exception("job %s: could not finish it (%s)", job_id, reason)

    def _watch(self) -> None:
        """Wait on the main processes' pidfds; a readable pidfd means the process exited."""
        while not self._closing:
            with self._lock:
                fds = list(self._watch_fds)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    job_id, pid = self._watch_fds.pop(fd)
                os.close(fd)
                child = self._children.get(pid)
                status = ""
                if child is not None:
                    child.wait()
                    status = f" with status {child.returncode}"
                self._finish_async(job_id, f"main process {pid} exited{status}")

    def close(self) -> None:
        self._closing = True
        os.write(self._wake_w, b"x")
        if self._watcher.is_alive():
            self._watcher.join(timeout=2)
        with self._lock:
            for fd in self._watch_fds:
                os.close(fd)
            self._watch_fds.clear()
            self._db.close()
