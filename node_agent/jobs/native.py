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

Memory first, the database after
--------------------------------
While the agent runs, the registry in memory is the truth: `get()`, `list_jobs()`, the
caller-ID locator and admission read it, and every change is made there first.
`jobs.sqlite` is its copy for the next start. Two orders matter:

- a job is recorded *before* its cgroups are made (recovery needs the record), so a start
  whose record cannot be written is refused (`RegistryFailure`, naming the state dir and
  the cause) and nothing is created;
- a job is killed *before* its end is recorded: ending never waits on the database. A job
  being ended shows state "ending" (admission adopts into "running" jobs only); once its
  processes are killed it is gone from memory, whatever the database says.

A write that fails (full or read-only state dir, I/O error) leaves the copy behind: one
ERROR line says so, and the keeper thread writes the whole registry again every
`SYNC_RETRY_S` until that works (one WARNING line then). Until then a crash loses what
changed since; `recover()` reconciles what it finds with the cgroup tree as above. An
ending that failed (processes that would not die, a cgroup that cannot be removed) leaves
the job "ending" and the keeper tries again after `END_RETRY_FIRST_S`, doubling up to
`END_RETRY_MAX_S`; each failed attempt is one WARNING line.

At start:

- a file that is not a database, or a malformed one, is moved aside to
  `jobs.sqlite.corrupt-<time>` (with its -wal and -shm), one ERROR line says so, and the
  registry is rebuilt from the cgroup tree by `recover()` into a fresh database: every job
  directory holding processes is registered again for the uid of its processes (start time:
  when its `main` cgroup was made; its main process is not known any more, so it ends on
  `job end` only), empty ones are removed;
- a state dir where the database cannot be opened for writing (read-only, full, not a
  directory) does not stop the agent. One ERROR line says so; it runs from memory, loaded
  from what the database still lets it read, or else rebuilt from the cgroup tree as
  above, and the keeper writes it out as soon as it can. Refusing to start would leave
  every job of the node unmanaged (no end when a main process exits, no `job end`, no
  adoption) for a problem that only concerns new jobs; those are refused until the state
  dir can record them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import select
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import callerid
from callerid import CgroupLayout, Job, ProcCgroup
from node_agent import jobenv, spawn
from node_agent.config import AgentConfig
from node_agent.errors import (
    AgentError,
    InvalidRequest,
    JobExists,
    JobNotFound,
    JobNotRunning,
    JobStartFailed,
    RegistryFailure,
    StartupError,
)
from node_agent.jobs.base import JobCgroup, JobRecord

log = logging.getLogger("node_agent.jobs.native")

#: The job's cgroup layout (the module docstring): processes of `adoptctl job run` live in
#: `main/`, adopted ssh logins in `adopted/`, ssh-to-job sessions in
#: `ssh-to-job/<session id>/`. Helpers of the agent's that run outside every job (the
#: clean-up of a session whose job ended) get `<subtree>/ssh-to-job-cleanup/job_<name>/
#: remove/`, one level below the jobs, where recovery never takes them for jobs (it lists
#: `<subtree>/job_*` only); the migration warm-up uses `<subtree>/` itself.
ADOPTED_LEAF = "adopted"
SSH_LEAF = "ssh-to-job"
CLEANUP_SUBTREE = "ssh-to-job-cleanup"
CLEANUP_LEAF = "remove"

JOB_START_TIMEOUT = 20.0   # the launcher, from start to exec'ing a job's main command

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
_COLUMNS = "id, user, uid, gid, start_time, main_pid, main_start, state"
_INSERT = f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"

#: While the database is behind memory, how often the keeper tries to write it again.
SYNC_RETRY_S = 5.0
#: An ending that failed is tried again after this, doubling each time, up to the max.
END_RETRY_FIRST_S = 2.0
END_RETRY_MAX_S = 60.0

# (id, user, uid, gid, start_time, main_pid, main_start, state), as stored.
Row = tuple[Any, ...]


@dataclass(frozen=True)
class _Retry:
    """An ending to try again: when (time.monotonic()), how many attempts failed, why the
    job was being ended, and the last failure."""

    when: float
    attempts: int
    reason: str
    cause: str


def _row(rec: JobRecord) -> Row:
    j = rec.job
    return (j.id, j.user, j.uid, j.gid, j.start_time, j.main_pid, rec.main_start, rec.state)


def _is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT ("database disk image is malformed") or SQLITE_NOTADB ("file is not a
    database"), extended codes included: the file cannot be trusted, only moved aside."""
    return isinstance(exc, _Corrupt) or (
        isinstance(exc, sqlite3.DatabaseError)
        and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_CORRUPT,
                                                             sqlite3.SQLITE_NOTADB))


class _Corrupt(sqlite3.DatabaseError):
    """`PRAGMA quick_check` found damage that no statement has tripped over yet."""


class _Store:
    """`<state_dir>/jobs.sqlite`, the registry's copy on disk. Not thread-safe: the
    registry calls it under its lock. Every method raises sqlite3.Error or OSError."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "jobs.sqlite"
        self._db: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> list[Row]:
        """Open (or create) the database for writing and return its rows."""
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            # A damaged page is otherwise found only by the statement that reads it,
            # perhaps in the middle of ending a job; check the whole (small) file now.
            problems = [r[0] for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _Corrupt(f"database disk image is malformed ({problems[0]})")
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs").fetchall()
        except BaseException:
            db.close()
            raise
        self._db = db
        return rows

    def read_only_rows(self) -> list[Row]:
        """The rows of a database that cannot be opened for writing (a read-only
        connection never creates or changes a file). Raises when it cannot be read either."""
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                             check_same_thread=False, isolation_level=None)
        try:
            return db.execute(f"SELECT {_COLUMNS} FROM jobs").fetchall()
        finally:
            db.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the database is not open")
        return self._db

    def put(self, rec: JobRecord) -> None:
        self._conn().execute(_INSERT, _row(rec))

    def delete(self, job_id: str) -> None:
        self._conn().execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def replace_all(self, recs: Iterable[JobRecord]) -> None:
        """Make the table hold exactly `recs`, in one transaction: all or nothing."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM jobs")
            db.executemany(_INSERT, [_row(r) for r in recs])
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (SQLITE_FULL) may or may not have rolled back already.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def move_aside(self) -> Path:
        """Rename the database and its -wal/-shm to `jobs.sqlite.corrupt-<time>[...]`,
        kept for a post-mortem. The state dir is root's (0700): nobody races the names."""
        self.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while any(Path(f"{aside}{s}").exists() for s in ("", "-wal", "-shm")):
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
        return aside

    def why(self, exc: BaseException) -> str:
        """The cause of a failure in one phrase. SQLite says only "unable to open database
        file" or "disk I/O error" where the file system could say more: ask it."""
        if isinstance(exc, OSError) and exc.strerror:
            text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
        else:
            text = str(exc) or type(exc).__name__
        try:
            fs = os.statvfs(self.dir)
        except OSError:
            return text
        if fs.f_flag & os.ST_RDONLY:
            return f"{text} (read-only file system)"
        if fs.f_bavail == 0 and "full" not in text:
            return f"{text} (no space left on device)"
        return text

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


class LayoutCgroup:
    """A `JobCgroup` of the native layout: the leaf `leaf` of job `job_id` in `layout`
    (`leaf` empty: the job's whole directory). `whole` (a helper's transient cgroup):
    remove() takes the job directory with it."""

    def __init__(self, layout: CgroupLayout, job_id: str, leaf: str, *, node: str,
                 whole: bool = False) -> None:
        self.layout, self.job_id, self.leaf, self.node, self.whole = (
            layout, job_id, leaf, node, whole)

    def __str__(self) -> str:
        if not self.layout.hierarchies:
            return f"job {self.job_id}: {self.leaf}"
        return str(self.layout.leaf_path(self.layout.hierarchies[0], self.job_id, self.leaf))

    def _paths(self) -> list[Path]:
        try:
            return [self.layout.leaf_path(h, self.job_id, self.leaf)
                    for h in self.layout.hierarchies]
        except callerid.InvalidJobId as e:
            raise callerid.CgroupError(str(e)) from None

    def create(self) -> list[str]:
        """Make the leaf (idempotent); its cgroup.procs files. JobNotFound when the job
        ended."""
        paths = self._paths()
        if not self.whole:
            if not all(self.layout.job_path(h, self.job_id).is_dir()
                       for h in self.layout.hierarchies):
                raise JobNotFound(self.job_id, self.node)   # ended meanwhile
            parent, _, _ = self.leaf.rpartition("/")
            leaves: tuple[str, ...] = (parent, self.leaf) if parent else (self.leaf,)
        else:
            leaves = (self.leaf,)
        self.layout.create_job(self.job_id, leaves=leaves)   # idempotent; v1 cpuset-aware
        return [str(p / "cgroup.procs") for p in paths]

    def join(self) -> list[str]:
        """The cgroup.procs files of the existing leaf; CgroupError when it is gone."""
        paths = self._paths()
        if not all(p.is_dir() for p in paths):
            raise callerid.CgroupError(f"{self} is gone")
        return [str(p / "cgroup.procs") for p in paths]

    def enroll(self, pid: int) -> None:
        """Nothing: the launcher joined the leaf itself, through `create`'s files."""

    def exists(self) -> bool:
        """Whether the leaf exists in any hierarchy."""
        return any(p.is_dir() for p in self._paths())

    def procs(self) -> set[int]:
        """The pids in the leaf and below."""
        try:
            return self.layout.procs(self.job_id, self.leaf or None)
        except (OSError, ValueError):
            return set()

    def kill(self, timeout: float) -> int:
        """SIGKILL everything in the leaf until empty; how many."""
        try:
            return self.layout.kill(self.job_id, timeout=timeout, leaf=self.leaf or None)
        except callerid.InvalidJobId as e:
            raise callerid.CgroupError(str(e)) from None

    def remove(self) -> None:
        """Remove the leaf (a helper's: its whole directory) once empty."""
        try:
            if self.whole:
                self.layout.remove(self.job_id)
            else:
                self.layout.remove(self.job_id, leaf=self.leaf)
        except callerid.InvalidJobId as e:
            raise callerid.CgroupError(str(e)) from None


def session_leaf(session_id: str) -> str:
    """The cgroup leaf (under the job) of one ssh-to-job session."""
    return f"{SSH_LEAF}/{session_id}"


class JobRegistry:
    """Jobs of this node; thread-safe. A `JobBackend` and a `JobControl`
    (node_agent.jobs.base), and so the `callerid.JobLocator` for this node."""

    def __init__(self, state_dir: str | os.PathLike[str], layout: CgroupLayout, *,
                 node: str, procfs: str = "/proc") -> None:
        self.layout = layout
        self.node = node
        self.procfs = procfs
        self._lock = threading.RLock()
        self._jobs: dict[str, JobRecord] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._finishing: dict[str, threading.Event] = {}
        self._watch_fds: dict[int, tuple[str, int]] = {}   # pidfd -> (job id, pid)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="job-watcher", daemon=True)
        # The database's state: `_behind` is True while it does not hold what memory
        # holds (a write failed); the keeper then rewrites it whole at `_sync_due`.
        self._store = _Store(state_dir)
        self._behind = False
        self._sync_due = 0.0
        self._end_retry: dict[str, _Retry] = {}  # endings to try again, by job id
        self._poke = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name="job-keeper", daemon=True)
        self._rebuilding = False
        self._loaded = self._open_store()

    # -- persistence -------------------------------------------------------------------
    def _open_store(self) -> list[Row]:
        """Open the database at start and return its rows; see the module docstring for
        what a corrupt or unwritable one gives. Never raises for the database's sake."""
        path = self._store.path
        try:
            return self._store.open()
        except (sqlite3.Error, OSError) as e:
            if _is_corrupt(e):
                return self._replace_corrupt(e)
            cause = self._store.why(e)
        self._mark_behind()
        try:
            rows = self._store.read_only_rows()
        except (sqlite3.Error, OSError):
            self._rebuilding = True
            log.error("cannot open the job registry %s for writing: %s; running from memory, "
                      "rebuilt from the cgroup tree; new jobs are refused until it can be "
                      "written (tried again every %g s)", path, cause, SYNC_RETRY_S)
            return []
        log.error("cannot open the job registry %s for writing: %s; running from memory "
                  "with its %d records; new jobs are refused until it can be written (tried "
                  "again every %g s)", path, cause, len(rows), SYNC_RETRY_S)
        return rows

    def _replace_corrupt(self, exc: BaseException) -> list[Row]:
        """At start: move a corrupt database aside and start a fresh one, to be filled
        from the cgroup tree by recover()."""
        path = self._store.path
        self._rebuilding = True
        try:
            aside = self._store.move_aside()
            self._store.open()
        except (sqlite3.Error, OSError) as e:
            self._mark_behind()
            log.error("the job registry %s is corrupt (%s) and cannot be replaced: %s; "
                      "running from memory, rebuilt from the cgroup tree; new jobs are "
                      "refused until it can be written (tried again every %g s)",
                      path, exc, self._store.why(e), SYNC_RETRY_S)
            return []
        log.error("the job registry %s is corrupt (%s): moved to %s; rebuilding it from the "
                  "cgroup tree", path, exc, aside.name)
        return []

    def _mark_behind(self) -> None:
        with self._lock:
            self._behind = True
            self._sync_due = time.monotonic() + SYNC_RETRY_S
        self._poke.set()

    def _write(self, what: str, change: Any, *args: Any) -> None:
        """Copy one change, already made in memory, to the database. A failure is logged
        once and leaves the rewrite to the keeper; it never stops the caller."""
        with self._lock:
            if self._behind:
                return  # the keeper rewrites everything, this change included
            try:
                change(*args)
            except (sqlite3.Error, OSError) as e:
                if _is_corrupt(e):
                    self._store.close()  # the keeper moves it aside and starts afresh
                self._mark_behind()
                log.error("cannot record jobs in %s (%s: %s); the registry stays right in "
                          "memory and is written again every %g s", self._store.path, what,
                          self._store.why(e), SYNC_RETRY_S)

    def _save(self, rec: JobRecord) -> None:
        with self._lock:
            self._jobs[rec.job.id] = rec
            self._write(f"job {rec.job.id} {rec.state}", self._store.put, rec)

    def _delete(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._write(f"job {job_id} ended", self._store.delete, job_id)

    def _rewrite(self) -> None:
        """Write the whole registry: the database is behind. Raises if that fails. The
        rows an old file holds are not read back: memory is the truth while running."""
        with self._lock:
            try:
                if not self._store.is_open:
                    self._store.open()
                self._store.replace_all(self._jobs.values())
            except (sqlite3.Error, OSError) as e:
                if not _is_corrupt(e):
                    raise
                aside = self._store.move_aside()
                log.error("the job registry %s is corrupt (%s): moved to %s; writing it "
                          "again from memory", self._store.path, e, aside.name)
                self._store.open()
                self._store.replace_all(self._jobs.values())
            self._behind = False
            log.warning("jobs recorded in %s again (%d jobs)", self._store.path,
                        len(self._jobs))

    def sync(self) -> bool:
        """If the database is behind, try to write it now; True if it is up to date.
        The keeper calls this every SYNC_RETRY_S. A failure logs nothing: the first
        one did, and a full disk must not fill the log too."""
        with self._lock:
            if not self._behind:
                return True
            try:
                self._rewrite()
            except (sqlite3.Error, OSError):
                self._sync_due = time.monotonic() + SYNC_RETRY_S
                return False
            return True

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> None:
        """Load the records and reconcile them with the cgroup tree (see module doc)."""
        rows, self._loaded = self._loaded, []
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
                try:
                    self.layout.remove(jid)
                except OSError as e:
                    # EBUSY: a process in it after all (it moved in since procs()). Not a
                    # reason to stop the agent from starting: the next start looks again.
                    log.warning("recover: cannot remove the cgroups of unknown job %s: %s",
                                jid, e)
                continue
            uid = self._uid_of(min(procs))
            try:
                pw = pwd.getpwuid(uid)
                user, gid = pw.pw_name, pw.pw_gid
            except KeyError:
                user, gid = str(uid), uid
            if self._rebuilding:
                log.warning("recover: job %s of %s rebuilt from its cgroups: %d processes",
                            jid, user, len(procs))
            else:
                log.warning("recover: cgroups of job %s hold %d processes but no record; "
                            "re-registering it for %s", jid, len(procs), user)
            self._save(JobRecord(Job(jid, user, uid, gid, self._made_at(jid), None),
                                 "running"))

    def start_watcher(self) -> None:
        """Start the threads: the main-process watcher and the keeper (database rewrites,
        endings tried again)."""
        self._watcher.start()
        self._keeper.start()

    def _uid_of(self, pid: int) -> int:
        try:
            return callerid.proc_uid(pid, self.procfs)
        except (OSError, ValueError):
            return 0

    def _made_at(self, job_id: str) -> float:
        """When the job's `main` cgroup was made (kernfs sets a directory's times when it
        is created, and `main` gets no children later), to keep a rebuilt job's place
        among the newest; now if no hierarchy tells."""
        times = []
        for h in self.layout.hierarchies:
            with contextlib.suppress(OSError):
                times.append(os.stat(self.layout.leaf_path(h, job_id)).st_mtime)
        return min(times, default=time.time())

    def _same_process(self, pid: int, start: int | None) -> bool:
        try:
            return start is None or callerid.proc_start_ticks(pid, self.procfs) == start
        except (OSError, ValueError):
            return False

    # -- queries -------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        """One job, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def list_jobs(self, user: str | None = None) -> list[JobRecord]:
        """The jobs (of `user` only, when given), oldest first."""
        with self._lock:
            recs = list(self._jobs.values())
        return sorted((r for r in recs if user is None or r.job.user == user),
                      key=lambda r: (r.job.start_time, r.job.id))

    def pids(self, job_id: str) -> list[int]:
        """The job's processes, its main process first."""
        rec = self.get(job_id)
        procs = self.layout.procs(job_id)
        main = rec.job.main_pid if rec else None
        return ([main] if main in procs else []) + sorted(procs - {main})

    def main_pid(self, job_id: str) -> int | None:
        """The job's main process, else its first that is no session's."""
        rec = self.get(job_id)
        if rec is None:
            return None
        pids = [p for p in self.pids(job_id) if p not in self.session_cgroup(job_id).procs()]
        main = rec.job.main_pid
        return main if main in pids else (pids[0] if pids else None)

    def environment(self, job_id: str) -> dict[str, str]:
        """The environment of the job's main process."""
        main = self.main_pid(job_id)
        if main is None:
            return {}
        return jobenv.read_environ(main, self.procfs)

    def cgroup_names(self, job_id: str) -> list[str]:
        """`hierarchy:path` of the job's cgroups."""
        return [f"{h.name}:{self.layout.job_path(h, job_id)}" for h in self.layout.hierarchies]

    def why_no_jobs(self) -> str:
        """"": nothing rules the registry's jobs out."""
        return ""

    def newest(self, records: Sequence[JobRecord]) -> JobRecord:
        """The job started last (ties: the larger id)."""
        return max(records, key=lambda r: (r.job.start_time, r.job.id))

    def adopt(self, job_id: str, pid: int) -> None:
        """Put an ssh login's process into the job's `adopted` leaf."""
        self.layout.attach(job_id, pid, leaf=ADOPTED_LEAF)

    def session_cgroup(self, job_id: str, session: str | None = None) -> JobCgroup:
        """`ssh-to-job/<session>` in the job (without a session: `ssh-to-job`)."""
        return LayoutCgroup(self.layout, job_id,
                            session_leaf(session) if session else SSH_LEAF, node=self.node)

    def helper_layout(self) -> CgroupLayout:
        """The layout of the helpers' cgroups (`<subtree>/ssh-to-job-cleanup`)."""
        return type(self.layout)(self.layout.hierarchies,
                                 f"{self.layout.subtree}/{CLEANUP_SUBTREE}",
                                 self.layout.v2_controllers)

    def helper_cgroup(self, name: str) -> JobCgroup:
        """`<subtree>/ssh-to-job-cleanup/job_<name>/remove`."""
        return LayoutCgroup(self.helper_layout(), name, CLEANUP_LEAF, node=self.node, whole=True)

    def leftover_helper_cgroups(self) -> list[JobCgroup]:
        """Helpers' cgroups an earlier run left."""
        helpers = self.helper_layout()
        return [LayoutCgroup(helpers, name, "", node=self.node, whole=True)
                for name in sorted(helpers.existing_jobs())]

    def scratch_cgroups(self) -> str | None:
        """`<subtree>` of the first hierarchy."""
        if not self.layout.hierarchies:
            return None
        return str(self.layout.subtree_path(self.layout.hierarchies[0]))

    # JobLocator: only jobs this registry knows count, whatever directories exist.
    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        """The job of a cgroup id (v2), if this registry knows it."""
        jid = self.layout.job_for_cgroup_id(cgroup_id)
        return jid if jid is not None and jid in self._jobs else None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        """The job of a process's cgroups, if this registry knows it."""
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
            self._record_start(rec)
        try:
            self.layout.create_job(job_id)
            if argv:
                pid, start = self._spawn(rec.job, pw, list(argv), cwd or pw.pw_dir,
                                         dict(env or {}), output or os.devnull)
                rec = replace(rec, job=replace(rec.job, main_pid=pid), main_start=start)
            rec = replace(rec, state="running")
            self._save(rec)
        except BaseException as e:
            if isinstance(e, AgentError):
                log.warning("job %s: start failed (%s); cleaning up", job_id, e)
            else:
                log.exception("job %s: start failed; cleaning up", job_id)
            self._finish(job_id, reason="start failed")  # failures: retried by the keeper
            raise
        if rec.job.main_pid:
            self._watch_pid(job_id, rec.job.main_pid)
        log.info("job %s of %s started on %s: main pid %s, cgroups %s", job_id, user, self.node,
                 rec.job.main_pid or "-", ", ".join(self.cgroup_names(job_id)))
        return rec

    def _record_start(self, rec: JobRecord) -> None:
        """Record a starting job before anything of it exists, or refuse it: recovery
        after a crash finds its cgroups through this record. Called under the lock."""
        self._jobs[rec.job.id] = rec
        try:
            try:
                if not self._behind:
                    self._store.put(rec)
                    return
            except sqlite3.DatabaseError as e:
                if not _is_corrupt(e):
                    raise
                self._mark_behind()
            # Behind: perhaps the state dir works again. Everything is written, or nothing.
            self._rewrite()
        except (sqlite3.Error, OSError) as e:
            del self._jobs[rec.job.id]
            cause = self._store.why(e)
            log.error("job %s not started: cannot record it in %s: %s", rec.job.id,
                      self._store.path, cause)
            raise RegistryFailure(
                f"cannot start job {rec.job.id} on {self.node}: the job registry in "
                f"{self._store.dir} cannot record it: {cause}") from None

    def _spawn(self, job: Job, pw: pwd.struct_passwd, argv: list[str], cwd: str,
               extra_env: dict[str, str], output: str) -> tuple[int, int | None]:
        env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "PATH": spawn.LOGIN_PATH,
            **jobenv.of_job(job.id, self.node),
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
            # Bounded: after it drops to the user, the launcher is the user's to stop
            # (SIGSTOP), and `adoptctl job run` must not wait on it for ever.
            proc = spawn.start(spec, timeout=JOB_START_TIMEOUT)
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
        """Move a running process into the job's `main` leaf."""
        rec = self.get(job_id)
        if rec is None:
            raise JobNotFound(job_id, self.node)
        if rec.state != "running":   # an ending job's processes are being killed
            raise JobNotRunning(job_id, self.node, rec.state)
        if pid <= 1 or not os.path.exists(f"{self.procfs}/{pid}"):
            raise InvalidRequest(f"no process {pid} on {self.node}")
        self.layout.attach(job_id, pid)
        log.info("job %s: attached pid %d", job_id, pid)
        return rec

    def end(self, job_id: str, timeout: float = 10.0) -> tuple[JobRecord, int]:
        """Kill every process of the job and forget it; (its record, processes killed).
        When the processes would not die, RegistryFailure says so: the job stays
        "ending" and the keeper tries again."""
        rec = self.get(job_id)
        if rec is None:
            raise JobNotFound(job_id, self.node)
        killed = self._finish(job_id, reason="ended on request", timeout=timeout)
        with self._lock:
            retry = self._end_retry.get(job_id)
        if retry is not None:
            raise RegistryFailure(
                f"job {job_id} on {self.node} is not ended yet: {retry.cause}; the agent "
                f"tries again in {max(0.0, retry.when - time.monotonic()):.0f} s")
        return rec, killed

    def _finish(self, job_id: str, *, reason: str, timeout: float = 10.0) -> int:
        """Kill what is left in the job, remove its cgroups, forget it. Idempotent, and
        one at a time per job: ending a job kills its main process, whose exit the
        watcher reports while the first _finish is still running; the second caller
        waits for the first instead of racing it over the same cgroups. A failure is
        logged and tried again later (`_end_failed`), never raised."""
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
                # Shown at once ("ending" in `adoptctl jobs`; admission adopts into
                # running jobs only). Recorded too, so that a crash during the kill
                # finishes it at the next start; but a record that cannot be written
                # (full disk) must not stop the kill: _save never raises.
                rec = replace(rec, state="ending")
                self._save(rec)
        try:
            killed = 0
            if job_id in self.layout.existing_jobs():
                killed = self.layout.kill(job_id, timeout=timeout)
                self.layout.remove(job_id)
        except Exception as e:  # whatever it was, the job must not stay half-ended
            self._end_failed(job_id, reason, e)
            return 0
        if rec and rec.job.main_pid:
            child = self._children.pop(rec.job.main_pid, None)
            if child is not None:
                child.wait()
        with self._lock:
            self._end_retry.pop(job_id, None)
            self._delete(job_id)  # gone from memory now; from the database when it can
        log.info("job %s ended on %s (%s): %d processes killed", job_id, self.node, reason, killed)
        return killed

    def _end_failed(self, job_id: str, reason: str, exc: Exception) -> None:
        """Keep the job "ending" and have the keeper try again, with a growing delay."""
        cause = str(exc) or type(exc).__name__
        with self._lock:
            prev = self._end_retry.get(job_id)
            attempts = prev.attempts + 1 if prev else 1
            delay = min(END_RETRY_FIRST_S * 2 ** min(attempts - 1, 16), END_RETRY_MAX_S)
            self._end_retry[job_id] = _Retry(time.monotonic() + delay, attempts, reason, cause)
        self._poke.set()
        # A cgroup error is expected here (processes in D state, a busy cgroup): one
        # line. Anything else is a bug: its traceback too.
        log.warning("job %s on %s: could not end it (%s, attempt %d): %s; trying again in "
                    "%g s", job_id, self.node, reason, attempts, cause, delay,
                    exc_info=not isinstance(exc, OSError))

    # -- the keeper: database rewrites, endings tried again ------------------------------
    def maintain(self, now: float | None = None) -> None:
        """One round of the keeper: rewrite the database if it is behind and that is due,
        and try again the endings that are due. `now` (time.monotonic()) lets a test be
        "later" without waiting."""
        now = time.monotonic() if now is None else now
        with self._lock:
            sync_due = self._behind and now >= self._sync_due
            due = [(j, r.reason) for j, r in self._end_retry.items() if r.when <= now]
        if sync_due:
            self.sync()
        for job_id, reason in due:
            with self._lock:
                if job_id not in self._end_retry:
                    continue  # Race: `job end` finished it meanwhile.
            self._finish(job_id, reason=reason)

    def _next_due(self) -> float | None:
        with self._lock:
            times = [r.when for r in self._end_retry.values()]
            if self._behind:
                times.append(self._sync_due)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _keep(self) -> None:
        while not self._closing:
            self._poke.wait(self._next_due())
            self._poke.clear()  # due times are read again before the next wait
            if self._closing:
                return
            try:
                self.maintain()
            except Exception:  # the keeper must keep going; nothing here is expected
                log.exception("job keeper: unexpected failure")

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
        """Stop the watcher and the keeper, close the database."""
        self._closing = True
        os.write(self._wake_w, b"x")
        self._poke.set()
        for thread in (self._watcher, self._keeper):
            if thread.is_alive():
                thread.join(timeout=2)
        with self._lock:
            for fd in self._watch_fds:
                os.close(fd)
            self._watch_fds.clear()
            if not self.sync():
                log.error("stopping with the job registry %s behind memory (%d jobs); the "
                          "next start reconciles what it holds with the cgroup tree",
                          self._store.path, len(self._jobs))
            self._store.close()

    def namespaces(self, job_id: str) -> list[tuple[str, int]]:
        """The namespaces of the job's main process that differ from the agent's (a job
        that made its own, e.g. ``unshare -m`` for a private /tmp), as (kind, fd).

        The main process the registry recorded, while it lives (its pid and start time:
        no cgroup is read, and a login into a job without namespaces pays a few stats);
        else the first of the job's processes that is no session's and stays long enough.
        Race: a pid may be reused before its namespaces are opened. So its start time is
        known first, and after opening it must still be the same process (and, when it
        was found in the job's cgroups, still in them); else its fds are closed and, for
        the main process, ProcessLookupError raised (its job's end is near), for another,
        the next one tried."""
        rec = self.get(job_id)
        if rec is None:
            raise ProcessLookupError(f"job {job_id} is gone")
        main, start = rec.job.main_pid, rec.main_start
        if main is not None and start is not None and self._same_process(main, start):
            got = jobenv.open_namespaces(main, self.procfs)
            if got and not self._same_process(main, start):
                jobenv.close_all(got)
                raise ProcessLookupError(f"job {job_id}: its process {main} went away "
                                         "while its namespaces were opened")
            return got
        # No main process (a job made by `job start`, or its main process has exited): the
        # job's other processes, each skipped when it exits meanwhile -- adopted logins come
        # and go. None left: no namespace of the job's outlives its processes.
        sessions = self.session_cgroup(job_id).procs()
        for pid in (p for p in self.pids(job_id) if p not in sessions):
            try:
                start = callerid.proc_start_ticks(pid, self.procfs)
                got = jobenv.open_namespaces(pid, self.procfs)
            except (OSError, ValueError):
                continue
            if self._same_process(pid, start) and pid in self.layout.procs(job_id):
                return got
            jobenv.close_all(got)
        return []


def open_registry(config: AgentConfig) -> JobRegistry:
    """The registry of `config`'s node: its cgroups discovered, recovered, its watcher
    running (call close() when done); StartupError when the cgroups are unusable."""
    try:
        layout = CgroupLayout.discover(config.cgroup, procfs=config.procfs)
    except Exception as e:
        raise StartupError(f"cgroups: {e}") from None
    registry = JobRegistry(config.state_dir, layout, node=config.node_name,
                           procfs=config.procfs)
    try:
        registry.recover()
        registry.start_watcher()
    except BaseException:
        registry.close()
        raise
    return registry
