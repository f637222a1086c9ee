"""The native job registry on a fake cgroup tree: persistence, reconciliation, races, and
what a state dir that cannot be written (full, read-only, not there) or a corrupt database
does to it.

Two stand-ins, both documented where they are made: `FakeKill` replaces
`CgroupLayout.kill` (the real one would SIGKILL the pids a test writes into the fake
`cgroup.procs` files), and `writes_refused()` turns on SQLite's own `query_only` on the
registry's connection, so every write fails inside SQLite as on a read-only state dir.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import callerid
from callerid import CgroupError, CgroupLayout, Hierarchy
from node_agent.errors import JobNotRunning, RegistryFailure
from node_agent.jobs import native as registry_mod
from node_agent.jobs.native import END_RETRY_FIRST_S, END_RETRY_MAX_S, JobRegistry
from tests.unit.conftest import FakeProc

LATER = 10 ** 6  # seconds: "much later" for JobRegistry.maintain(now=...)


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupLayout:
    import pwd as pwd_mod

    def getpwnam(name: str) -> pwd_mod.struct_passwd:
        return pwd_mod.struct_passwd((name, "x", 1001, 1001, "", "/home/x", "/bin/sh"))

    def getpwuid(uid: int) -> pwd_mod.struct_passwd:
        if uid != 1000:
            raise KeyError(uid)
        return pwd_mod.struct_passwd(("carol", "x", 1000, 100, "", "/home/c", "/bin/sh"))

    monkeypatch.setattr("node_agent.jobs.native.pwd.getpwnam", getpwnam)
    monkeypatch.setattr("node_agent.jobs.native.pwd.getpwuid", getpwuid)
    hier = (Hierarchy("freezer", 1, tmp_path / "cg" / "freezer"),
            Hierarchy("unified", 2, tmp_path / "cg" / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    return CgroupLayout(hier, "callerid")


class FakeKill:
    """CgroupLayout.kill for the fake tree: "kills" a job by removing its cgroup.procs
    files (as the kernel's go with the removed directories), returns how many pids they
    listed; raises CgroupError, as the real one does when processes would not die, while
    `failures` is above 0."""

    def __init__(self, layout: CgroupLayout, failures: int = 0) -> None:
        self.layout = layout
        self.failures = failures
        self.calls: list[str] = []

    def __call__(self, job_id: str, timeout: float = 10.0, leaf: str | None = None) -> int:
        self.calls.append(job_id)
        if self.failures > 0:
            self.failures -= 1
            raise CgroupError(f"job {job_id}: 1 process(es) still alive after {timeout:g}s: "
                              "[4242]")
        killed = len(self.layout.procs(job_id))
        for h in self.layout.hierarchies:
            for procs in self.layout.job_path(h, job_id).rglob("cgroup.procs"):
                procs.unlink()
        return killed


@pytest.fixture
def kill(layout: CgroupLayout, monkeypatch: pytest.MonkeyPatch) -> FakeKill:
    fake = FakeKill(layout)
    monkeypatch.setattr(layout, "kill", fake)
    return fake


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    proc.add_process(4242, ruid=1000)  # carol's, in the jobs' cgroups where a test says so
    return proc


def holds(layout: CgroupLayout, job_id: str, pid: int = 4242) -> None:
    """Put a (fake) process into the job's main leaf."""
    (layout.leaf_path(layout.hierarchies[1], job_id) / "cgroup.procs").write_text(f"{pid}\n")


def writes_refused(reg: JobRegistry, refused: bool = True) -> None:
    """SQLite refuses every write on the registry's connection ("attempt to write a
    readonly database"), as on a read-only or full state dir; reads still work."""
    reg._store._conn().execute(f"PRAGMA query_only={int(refused)}")


def stored(state: Path) -> dict[str, str]:
    """What jobs.sqlite holds, read through a connection of its own: id -> state."""
    db = sqlite3.connect(state / "jobs.sqlite")
    try:
        return dict(db.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        db.close()


def set_stored(state: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(state / "jobs.sqlite", isolation_level=None)
    try:
        db.execute(sql, args)
    finally:
        db.close()


def opening_for_writing_fails(monkeypatch: pytest.MonkeyPatch) -> Any:
    """From now on the database cannot be opened for writing (as on a full file
    system); returns the real opener, to put back."""
    real_open = registry_mod._Store.open

    def open_fails(self: registry_mod._Store) -> list[registry_mod.Row]:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(registry_mod._Store, "open", open_fails)
    return real_open


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def reg(tmp_path: Path, layout: CgroupLayout, kill: FakeKill,
        fake_proc: FakeProc) -> Iterator[JobRegistry]:
    r = JobRegistry(tmp_path / "state", layout, node="n", procfs=str(fake_proc.root))
    r.recover()
    yield r
    r.close()


def test_concurrent_ends_of_one_job_run_once(tmp_path: Path, layout: CgroupLayout,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reg = JobRegistry(tmp_path / "state", layout, node="n")
    reg.recover()
    reg.start("42", "alice")
    kills = []

    def slow_kill(job_id: str, timeout: float = 10.0) -> int:
        kills.append(job_id)
        time.sleep(0.2)  # the watcher reports the main process's exit meanwhile
        return 1

    monkeypatch.setattr(layout, "kill", slow_kill)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        reg._finish("42", reason="test"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kills == ["42"]
    assert sorted(results) == [0, 0, 1]
    assert reg.get("42") is None and "42" not in layout.existing_jobs()
    reg.close()


def test_records_survive_and_orphans_are_reconciled(tmp_path: Path,
                                                     layout: CgroupLayout) -> None:
    reg = JobRegistry(tmp_path / "state", layout, node="n")
    reg.recover()
    reg.start("live", "alice")
    reg.start("gone", "alice")
    reg.close()
    # Behind the agent's back: "gone" lost its cgroups; an unknown empty job dir appeared.
    for h in layout.hierarchies:
        for p in sorted(layout.job_path(h, "gone").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        layout.job_path(h, "gone").rmdir()
    layout.create_job("stray")
    (layout.leaf_path(layout.hierarchies[1], "live") / "cgroup.procs").write_text("1\n")
    again = JobRegistry(tmp_path / "state", layout, node="n")
    again.recover()
    assert [r.job.id for r in again.list_jobs()] == ["live"]
    assert "stray" not in layout.existing_jobs()
    again.close()


# -- kill first, record after ---------------------------------------------------------------

def test_end_kills_first_when_the_database_cannot_be_written(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout, kill: FakeKill,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "node_agent.jobs.native")
    reg.start("A", "alice")
    reg.start("B", "alice")
    holds(layout, "B")
    writes_refused(reg)
    rec, killed = reg.end("B")
    assert (rec.job.id, killed) == ("B", 1) and kill.calls == ["B"]
    # Gone from memory at once (nothing adopts into it), and its cgroups with it ...
    assert reg.get("B") is None and [r.job.id for r in reg.list_jobs()] == ["A"]
    assert "B" not in layout.existing_jobs()
    # ... while the database still says what it said before.
    assert stored(tmp_path / "state") == {"A": "running", "B": "running"}
    [error] = lines(caplog, "cannot record jobs")
    assert str(tmp_path / "state" / "jobs.sqlite") in error and "readonly" in error
    # More changes and more failed rewrites: still one line.
    reg.end("A")
    reg.maintain(now=time.monotonic() + LATER)
    reg.maintain(now=time.monotonic() + 2 * LATER)
    assert len(lines(caplog, "cannot record jobs")) == 1
    assert reg.list_jobs() == [] and stored(tmp_path / "state") == {"A": "running",
                                                                    "B": "running"}
    # The state dir works again: the next rewrite catches up, with one line.
    writes_refused(reg, False)
    reg.maintain(now=time.monotonic() + LATER)
    assert stored(tmp_path / "state") == {}
    assert lines(caplog, "jobs recorded in") == [
        f"jobs recorded in {tmp_path / 'state' / 'jobs.sqlite'} again (0 jobs)"]
    reg.maintain(now=time.monotonic() + 2 * LATER)
    assert len(lines(caplog, "jobs recorded in")) == 1


def test_a_job_ending_shows_ending_and_the_rewrite_is_not_early(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg.start("A", "alice")
    reg.start("B", "alice")
    writes_refused(reg)
    seen: list[list[tuple[str, str]]] = []

    def kill_and_look(job_id: str, timeout: float = 10.0, leaf: str | None = None) -> int:
        seen.append([(r.job.id, r.state) for r in reg.list_jobs()])
        return 0

    monkeypatch.setattr(layout, "kill", kill_and_look)
    reg.end("A")
    assert seen == [[("A", "ending"), ("B", "running")]]
    writes_refused(reg, False)
    reg.maintain()  # not due yet: the database stays behind for now
    assert stored(tmp_path / "state") == {"A": "running", "B": "running"}
    reg.maintain(now=time.monotonic() + LATER)
    assert stored(tmp_path / "state") == {"B": "running"}


def test_the_keeper_thread_rewrites_the_database(
        tmp_path: Path, reg: JobRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "SYNC_RETRY_S", 0.05)
    reg.start("A", "alice")
    reg.start_watcher()
    writes_refused(reg)
    reg.end("A")
    writes_refused(reg, False)
    deadline = time.monotonic() + 20  # a bound for a hung thread, not a timing check
    while stored(tmp_path / "state") != {}:
        assert time.monotonic() < deadline, "the keeper never rewrote the database"
        time.sleep(0.02)


def test_a_later_start_rewrites_what_was_behind(
        tmp_path: Path, reg: JobRegistry, caplog: pytest.LogCaptureFixture) -> None:
    reg.start("A", "alice")
    writes_refused(reg)
    reg.end("A")
    writes_refused(reg, False)
    reg.start("B", "alice")  # before the keeper's turn: recorded with everything else
    assert stored(tmp_path / "state") == {"B": "running"}
    assert len(lines(caplog, "jobs recorded in")) == 1


# -- an ending that failed is tried again ---------------------------------------------------

def test_a_failed_end_stays_ending_and_is_tried_again(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout, kill: FakeKill,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "node_agent.jobs.native")
    reg.start("A", "alice")
    holds(layout, "A")
    kill.failures = 2
    with pytest.raises(RegistryFailure, match=r"^job A on n is not ended yet: job A: 1 "
                       r"process\(es\) still alive after 10s: \[4242\]; the agent tries "
                       r"again in \d+ s$"):
        reg.end("A")
    rec = reg.get("A")
    assert rec is not None and rec.state == "ending"
    assert stored(tmp_path / "state") == {"A": "ending"}
    reg.maintain()  # not due yet
    assert kill.calls == ["A"]
    reg.maintain(now=time.monotonic() + LATER)  # fails again: the delay doubles
    assert kill.calls == ["A", "A"] and reg.get("A") is not None
    reg.maintain(now=time.monotonic() + LATER)
    assert kill.calls == ["A", "A", "A"]
    assert reg.get("A") is None and "A" not in layout.existing_jobs()
    assert stored(tmp_path / "state") == {}
    assert [m.split("; ")[-1] for m in lines(caplog, "could not end it")] == [
        f"trying again in {END_RETRY_FIRST_S:g} s", f"trying again in {2 * END_RETRY_FIRST_S:g} s"]
    assert "ended on request" in lines(caplog, "job A ended on n")[0]


def test_nothing_joins_an_ending_job(tmp_path: Path, reg: JobRegistry, layout: CgroupLayout,
                                     kill: FakeKill) -> None:
    """A job whose end failed is still "ending": no process is attached to it, and no
    ssh-to-job session opens in it, until it is ended for good."""
    from node_agent.agent.sessions import JobShellSessions

    reg.start("A", "alice")
    holds(layout, "A")
    kill.failures = 1
    with pytest.raises(RegistryFailure):
        reg.end("A")
    with pytest.raises(JobNotRunning, match="^job A on n is ending, not running$"):
        reg.attach("A", os.getpid())
    shells = JobShellSessions(reg, tmp_path / "sessions", "n", procfs=str(tmp_path / "proc"))
    with pytest.raises(JobNotRunning):
        shells.open("A", 0, True, "ssh-ed25519 AAAA", [])
    assert layout.procs("A") == {4242}


def test_the_retry_delay_is_bounded(reg: JobRegistry, kill: FakeKill,
                                    caplog: pytest.LogCaptureFixture) -> None:
    reg.start("A", "alice")
    kill.failures = 12
    reg._finish("A", reason="test")
    for _ in range(11):
        reg.maintain(now=time.monotonic() + LATER)
    delays = [float(m.rsplit(" in ", 1)[1].split()[0]) for m in lines(caplog, "could not end")]
    assert delays[:3] == [END_RETRY_FIRST_S, 2 * END_RETRY_FIRST_S, 4 * END_RETRY_FIRST_S]
    assert max(delays) == END_RETRY_MAX_S and delays[-1] == END_RETRY_MAX_S
    reg.maintain(now=time.monotonic() + LATER)
    assert reg.get("A") is None


def test_a_main_process_exit_whose_end_fails_is_tried_again(
        reg: JobRegistry, kill: FakeKill) -> None:
    reg.start("A", "alice")
    kill.failures = 1
    reg._finish_quietly("A", "main process 4242 exited")  # what the watcher runs
    rec = reg.get("A")
    assert rec is not None and rec.state == "ending"
    reg.maintain(now=time.monotonic() + LATER)
    assert reg.get("A") is None and kill.calls == ["A", "A"]


# -- a start that cannot be recorded is refused ------------------------------------------

def test_start_is_refused_when_its_record_cannot_be_written(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout) -> None:
    writes_refused(reg)
    with pytest.raises(RegistryFailure) as err:
        reg.start("C", "alice")
    assert str(err.value) == (f"cannot start job C on n: the job registry in {tmp_path / 'state'}"
                              " cannot record it: attempt to write a readonly database")
    assert reg.get("C") is None and "C" not in layout.existing_jobs()
    writes_refused(reg, False)
    reg.start("C", "alice")
    assert stored(tmp_path / "state") == {"C": "running"}


def test_start_is_refused_while_the_database_stays_behind(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout) -> None:
    reg.start("A", "alice")
    writes_refused(reg)
    reg.end("A")
    with pytest.raises(RegistryFailure, match="cannot record it: attempt to write a readonly"):
        reg.start("C", "alice")
    assert reg.list_jobs() == [] and layout.existing_jobs() == set()
    assert stored(tmp_path / "state") == {"A": "running"}


# -- a state dir that cannot be written at start ------------------------------------------

def test_unwritable_state_dir_at_start_runs_from_the_cgroup_tree(
        tmp_path: Path, layout: CgroupLayout, kill: FakeKill, fake_proc: FakeProc,
        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "var"
    blocker.write_text("a file where the state dir's parent should be\n")
    state = blocker / "state"
    layout.create_job("J")
    holds(layout, "J")
    layout.create_job("stale")  # empty: removed
    reg = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    try:
        reg.recover()
        [(job, user, uid)] = [(r.job.id, r.job.user, r.job.uid) for r in reg.list_jobs()]
        assert (job, user, uid) == ("J", "carol", 1000)
        assert layout.existing_jobs() == {"J"}
        [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert error.getMessage() == (
            f"cannot open the job registry {state}/jobs.sqlite for writing: Not a directory: "
            f"{state}; running from memory, rebuilt from the cgroup tree; new jobs are "
            f"refused until it can be written (tried again every 5 s)")
        with pytest.raises(RegistryFailure, match=f"the job registry in {state} cannot "
                                                  "record it: Not a directory"):
            reg.start("K", "alice")
        # Ending still works, from memory.
        reg.end("J")
        assert reg.list_jobs() == [] and layout.existing_jobs() == set()
        # The state dir can be made: the keeper writes the registry out; starts work.
        blocker.unlink()
        reg.maintain(now=time.monotonic() + LATER)
        assert stored(state) == {}
        reg.start("K", "alice")
        assert stored(state) == {"K": "running"}
    finally:
        reg.close()


def test_unwritable_but_readable_database_keeps_its_records(
        tmp_path: Path, layout: CgroupLayout, kill: FakeKill, fake_proc: FakeProc,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    first = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    first.recover()
    first.start("A", "alice")
    holds(layout, "A")
    first.close()
    start_time = stored_start(state, "A")
    # Opening for writing fails (here: SQLite cannot set up its write-ahead log, as on
    # a full or read-only file system); reading does not.
    real_open = opening_for_writing_fails(monkeypatch)
    reg = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    try:
        reg.recover()
        [rec] = reg.list_jobs()
        assert (rec.job.id, rec.job.user, rec.job.start_time) == ("A", "alice", start_time)
        assert lines(caplog, "for writing") == [
            f"cannot open the job registry {state}/jobs.sqlite for writing: database or disk "
            "is full; running from memory with its 1 records; new jobs are refused until it "
            "can be written (tried again every 5 s)"]
        reg.end("A")
        monkeypatch.setattr(registry_mod._Store, "open", real_open)
        reg.maintain(now=time.monotonic() + LATER)
        assert stored(state) == {}
    finally:
        reg.close()


def stored_start(state: Path, job_id: str) -> float:
    db = sqlite3.connect(state / "jobs.sqlite")
    try:
        [(start,)] = db.execute("SELECT start_time FROM jobs WHERE id = ?", (job_id,))
        return float(start)
    finally:
        db.close()


# -- a corrupt database --------------------------------------------------------------------

def not_a_database(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not SQLite\n" * 512)


def malformed(path: Path) -> None:
    with open(path, "r+b") as f:  # page 2 of 3: a table or index page of jobs
        f.seek(4096)
        f.write(b"\xff" * 4096)


@pytest.mark.parametrize("damage, what", [(not_a_database, "file is not a database"),
                                          (malformed, "database disk image is malformed")])
def test_corrupt_database_is_moved_aside_and_rebuilt_from_the_cgroup_tree(
        tmp_path: Path, layout: CgroupLayout, kill: FakeKill, fake_proc: FakeProc,
        caplog: pytest.LogCaptureFixture, damage: object, what: str) -> None:
    state = tmp_path / "state"
    first = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    first.recover()
    first.start("live", "alice")
    first.start("idle", "alice")
    holds(layout, "live")
    first.close()
    made = min(os.stat(layout.leaf_path(h, "live")).st_mtime for h in layout.hierarchies)
    assert callable(damage)
    damage(state / "jobs.sqlite")
    broken = (state / "jobs.sqlite").read_bytes()
    reg = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    try:
        reg.recover()
        # The job with processes is back, for the uid of its processes, at its place in
        # time; the one without processes is gone with its cgroups.
        [rec] = reg.list_jobs()
        assert (rec.job.id, rec.job.user, rec.job.uid, rec.state) == ("live", "carol", 1000,
                                                                      "running")
        assert rec.job.start_time == made and rec.job.main_pid is None
        assert layout.existing_jobs() == {"live"}
        assert stored(state) == {"live": "running"}
        [aside] = state.glob("jobs.sqlite.corrupt-*[0-9]")
        assert aside.read_bytes() == broken
        [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert error == (f"the job registry {state}/jobs.sqlite is corrupt ({what}): moved "
                         f"to {aside.name}; rebuilding it from the cgroup tree")
    finally:
        reg.close()


def test_a_corrupt_database_found_later_is_replaced_from_memory(
        tmp_path: Path, layout: CgroupLayout, kill: FakeKill, fake_proc: FakeProc,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    not_a_database(state / "jobs.sqlite")
    layout.create_job("J")
    holds(layout, "J")
    # At start the file cannot be opened for writing (as on a full file system) nor read.
    real_open = opening_for_writing_fails(monkeypatch)
    reg = JobRegistry(state, layout, node="n", procfs=str(fake_proc.root))
    try:
        reg.recover()
        assert [r.job.id for r in reg.list_jobs()] == ["J"]
        monkeypatch.setattr(registry_mod._Store, "open", real_open)
        reg.start("K", "alice")  # the rewrite finds the damage, moves it aside, writes
        assert stored(state) == {"J": "running", "K": "running"}
        [aside] = state.glob("jobs.sqlite.corrupt-*[0-9]")
        assert lines(caplog, "is corrupt") == [
            f"the job registry {state}/jobs.sqlite is corrupt (file is not a database): "
            f"moved to {aside.name}; writing it again from memory"]
    finally:
        reg.close()


# -- recover(): the branches ---------------------------------------------------------------

def reopen(tmp_path: Path, layout: CgroupLayout, procfs: str) -> JobRegistry:
    r = JobRegistry(tmp_path / "state", layout, node="n", procfs=procfs)
    r.recover()
    return r


def test_recover_cleans_up_an_interrupted_start(tmp_path: Path, reg: JobRegistry,
                                                layout: CgroupLayout, kill: FakeKill,
                                                fake_proc: FakeProc) -> None:
    for job in ("empty", "busy", "nocg"):
        reg.start(job, "alice")
    holds(layout, "busy")
    reg.close()
    for h in layout.hierarchies:
        for d in sorted(layout.job_path(h, "nocg").rglob("*"), reverse=True):
            d.rmdir()
        layout.job_path(h, "nocg").rmdir()
    # The agent died between recording "starting" and recording "running".
    set_stored(tmp_path / "state", "UPDATE jobs SET state = 'starting'")
    again = reopen(tmp_path, layout, str(fake_proc.root))
    try:
        # Without processes: its cgroups removed (nothing to kill), its record dropped;
        # with processes: it runs, so it is a job; without cgroups: dropped.
        assert [(r.job.id, r.state) for r in again.list_jobs()] == [("busy", "starting")]
        assert layout.existing_jobs() == {"busy"}
        assert kill.calls == ["empty"]
        assert stored(tmp_path / "state") == {"busy": "starting"}
    finally:
        again.close()


def test_recover_finishes_an_interrupted_end(tmp_path: Path, reg: JobRegistry,
                                             layout: CgroupLayout, kill: FakeKill,
                                             fake_proc: FakeProc) -> None:
    reg.start("E", "alice")
    reg.start("R", "alice")
    holds(layout, "E")
    holds(layout, "R")
    reg.close()
    set_stored(tmp_path / "state", "UPDATE jobs SET state = 'ending' WHERE id = 'E'")
    again = reopen(tmp_path, layout, str(fake_proc.root))
    try:
        assert kill.calls == ["E"]
        assert [r.job.id for r in again.list_jobs()] == ["R"]
        assert layout.existing_jobs() == {"R"}
        assert stored(tmp_path / "state") == {"R": "running"}
    finally:
        again.close()


def test_recover_tells_a_recycled_main_pid_from_the_main_process(
        tmp_path: Path, reg: JobRegistry, layout: CgroupLayout, kill: FakeKill) -> None:
    # A real process as "the main process" (recover reads /proc and opens a pidfd on it).
    main = subprocess.Popen(["sleep", "1000"])
    try:
        ticks = callerid.proc_start_ticks(main.pid)
        for job in ("same", "recycled", "gone"):
            reg.start(job, "alice")
            holds(layout, job)
        reg.close()
        state = tmp_path / "state"
        set_stored(state, "UPDATE jobs SET main_pid = ?, main_start = ? WHERE id = 'same'",
                   main.pid, ticks)
        # Same pid, another start time: the pid was reused by an unrelated process.
        set_stored(state, "UPDATE jobs SET main_pid = ?, main_start = ? WHERE id = "
                   "'recycled'", main.pid, ticks + 1)
        main_gone = subprocess.Popen(["true"])
        main_gone.wait()
        set_stored(state, "UPDATE jobs SET main_pid = ?, main_start = 1 WHERE id = 'gone'",
                   main_gone.pid)
        again = reopen(tmp_path, layout, "/proc")
        try:
            assert sorted(kill.calls) == ["gone", "recycled"]
            [rec] = again.list_jobs()
            assert (rec.job.id, rec.job.main_pid) == ("same", main.pid)
            assert layout.existing_jobs() == {"same"}
            assert stored(state) == {"same": "running"}
        finally:
            again.close()
    finally:
        main.kill()
        main.wait()
