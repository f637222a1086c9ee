"""Job cgroups on cgroup v1, v2 and hybrid hosts: create, adopt into, list, kill, remove,
and map a cgroup (by v2 id or by ``/proc/<pid>/cgroup`` path) back to a job.

Layout: in every configured hierarchy a job owns ``<mount>/<subtree>/job_<id>/`` and its
processes live in leaves below it (``.../job_<id>/main``, one per adopted session if the
caller wants). Cgroup v2 forbids processes in a cgroup that distributes controllers to
children (the "no internal processes" rule, Documentation/admin-guide/cgroup-v2.rst), so
the job directory itself stays empty; v1 uses the same shape so that code and paths are
the same everywhere.

Every mount is found under ``CgroupConfig.mount_root`` (``/sys/fs/cgroup``), which tests
point at a tree under ``tmp_path``: there, control files are plain files, so writes land
in them and reads give back what was written. Nothing here is specific to a scheduler.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._errors import CgroupError, InvalidJobId, KernelFormatError
from ._jobs import validate_job_id
from ._procfs import ProcCgroup

__all__ = ["CgroupConfig", "CgroupLayout", "Hierarchy"]

PathLike = str | os.PathLike[str]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
_JOB_PREFIX = "job_"
# How long a cgroup id that names no job is remembered as such (seconds).
_MISS_TTL = 1.0
_POLL_S = 0.02
#: errno of a cgroup file whose group was removed meanwhile (ENODEV: being deactivated).
_GONE = (errno.ENOENT, errno.ENODEV)


@dataclass(frozen=True, slots=True)
class CgroupConfig:
    """Which hierarchies hold job cgroups and where.

    ``v1``: v1 hierarchies by controller (``"freezer"``, ``"pids"``, ``"cpuacct"``) or by
    name (``"name=X"``). ``v2``: also use the unified hierarchy. ``v2_controllers``:
    controllers enabled in ``cgroup.subtree_control`` from the subtree down to job
    directories. ``subtree``: a relative path below each mount; jobs live at
    ``<mount>/<subtree>/job_<id>``.
    """

    mount_root: str = "/sys/fs/cgroup"
    v1: tuple[str, ...] = ("freezer",)
    v2: bool = True
    v2_controllers: tuple[str, ...] = ()
    subtree: str = "callerid"


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """One mounted cgroup hierarchy: ``name`` is ``"unified"`` for v2, else the configured
    v1 controller or ``name=X``; ``version`` is 1 or 2."""

    name: str
    version: int
    mountpoint: Path

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(self.name.split(",")) if self.version == 1 else frozenset()

    def __str__(self) -> str:
        return f"{self.name} (v{self.version}) at {self.mountpoint}"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or ".." in name:
        raise ValueError(f"invalid {kind} {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . + -")
    return name


def _check_leaf(leaf: str) -> str:
    """A leaf is a name, or a relative path of names (``ssh-to-job/<session>``)."""
    parts = leaf.split("/") if isinstance(leaf, str) else []
    if not parts:
        raise ValueError(f"invalid leaf name {leaf!r}")
    for part in parts:
        _check_name("leaf name", part)
    return leaf


def _check_subtree(subtree: str) -> str:
    parts = subtree.split("/") if isinstance(subtree, str) else []
    if not parts or subtree.startswith("/"):
        raise ValueError(f"invalid cgroup subtree {subtree!r}: must be a relative path")
    for part in parts:
        _check_name("cgroup subtree component", part)
    return subtree


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount_path(text: str) -> str:
    # fs/proc_namespace.c show_mountinfo -> seq_path_root escapes " \t\n\\" as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


@dataclass(frozen=True, slots=True)
class _Mount:
    mountpoint: str
    fstype: str
    super_options: tuple[str, ...]


def _parse_mountinfo(path: str) -> Iterator[_Mount]:
    """Yield the mounts of a ``/proc/<pid>/mountinfo`` file
    (Documentation/filesystems/proc.rst, "3.5 /proc/<pid>/mountinfo")::

        36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)

    Field 7 is zero or more optional fields ended by the "-" separator (8).
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                sep = fields.index("-", 6)
            except ValueError:
                raise KernelFormatError(path, lineno, line, "no '-' separator") from None
            after = fields[sep + 1 :]
            if len(after) < 2:
                raise KernelFormatError(path, lineno, line, "too few fields after '-'")
            # after = [fstype, source, super options]; str.split() drops an empty source,
            # so the super options are taken as the last field either way.
            yield _Mount(_unescape_mount_path(fields[4]), after[0], tuple(after[-1].split(",")))


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def _write(path: Path, text: str) -> None:
    """One write(2) of *text*: cgroupfs acts on each write, and may reject a partial one."""
    # O_CREAT|O_APPEND: in a fake tree (tests) control files are plain files that appear on
    # first write and accumulate lines like cgroup.procs does; on cgroupfs the file always
    # exists (kernfs cannot create one, so a missing file still fails) and both flags are
    # ignored.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class CgroupLayout:
    """The job cgroups of one node, in each configured hierarchy.

    Build one with :meth:`discover` (from ``mountinfo``) or directly from
    :class:`Hierarchy` objects. It also implements the resolver's ``JobLocator``
    protocol (:meth:`job_for_cgroup_id`, :meth:`job_for_proc_cgroups`).
    """

    def __init__(
        self,
        hierarchies: Sequence[Hierarchy],
        subtree: str,
        v2_controllers: Sequence[str] = (),
    ) -> None:
        self.hierarchies: tuple[Hierarchy, ...] = tuple(hierarchies)
        self.subtree = _check_subtree(subtree)
        self.v2_controllers: tuple[str, ...] = tuple(
            _check_name("cgroup v2 controller", c) for c in v2_controllers
        )
        versions = [h.version for h in self.hierarchies]
        if any(v not in (1, 2) for v in versions) or versions.count(2) > 1:
            raise ValueError("hierarchies: versions must be 1 or 2, with at most one v2")
        self._v2 = next((h for h in self.hierarchies if h.version == 2), None)
        # cgroup id (v2 directory inode) -> (job id, directory); see job_for_cgroup_id.
        self._id_cache: dict[int, tuple[str, Path]] = {}
        self._miss_cache: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"CgroupLayout({list(self.hierarchies)!r}, {self.subtree!r})"

    @classmethod
    def discover(cls, config: CgroupConfig, procfs: PathLike = "/proc") -> CgroupLayout:
        """Find the configured hierarchies in ``<procfs>/self/mountinfo``.

        Only mounts at or under ``config.mount_root`` count. A v1 hierarchy is the
        ``cgroup`` mount whose super options list the controller (``cpu,cpuacct`` serves
        ``cpuacct``) or the ``name=X``; v2 is the ``cgroup2`` mount. If a hierarchy is
        mounted more than once, the last entry (the one on top) wins. A configured
        hierarchy that is not mounted raises :class:`CgroupError`.
        """
        _check_subtree(config.subtree)
        root = os.path.normpath(config.mount_root)
        mounts = [
            m
            for m in _parse_mountinfo(f"{os.fspath(procfs)}/self/mountinfo")
            if _under(os.path.normpath(m.mountpoint), root)
        ]
        found: list[Hierarchy] = []
        for ctrl in config.v1:
            _check_name("cgroup v1 hierarchy", ctrl.removeprefix("name="))
            hits = [m for m in mounts if m.fstype == "cgroup" and ctrl in m.super_options]
            if not hits:
                kind = "named hierarchy" if ctrl.startswith("name=") else "controller"
                raise CgroupError(
                    f"cgroup v1 {kind} {ctrl!r} is not mounted under {config.mount_root}",
                    config.mount_root,
                )
            found.append(Hierarchy(ctrl, 1, Path(hits[-1].mountpoint)))
        if config.v2:
            hits = [m for m in mounts if m.fstype == "cgroup2"]
            if not hits:
                raise CgroupError(
                    f"cgroup v2 (cgroup2) is not mounted under {config.mount_root}",
                    config.mount_root,
                )
            found.append(Hierarchy("unified", 2, Path(hits[-1].mountpoint)))
        if not found:
            raise CgroupError("no cgroup hierarchy configured (v1 is empty and v2 is off)")
        return cls(found, config.subtree, config.v2_controllers)

    # -- paths ---------------------------------------------------------------------------

    def subtree_path(self, h: Hierarchy) -> Path:
        return h.mountpoint / self.subtree

    def job_path(self, h: Hierarchy, job_id: str) -> Path:
        """``<mount>/<subtree>/job_<id>``; raises InvalidJobId for an unsafe id."""
        return h.mountpoint / self.subtree / (_JOB_PREFIX + validate_job_id(job_id))

    def leaf_path(self, h: Hierarchy, job_id: str, leaf: str = "main") -> Path:
        """``<job_path>/<leaf>``: processes live in leaves only (the v2 rule; v1 alike).
        A leaf may be nested (``ssh-to-job/<session>``)."""
        return self.job_path(h, job_id) / _check_leaf(leaf)

    def _top(self, h: Hierarchy, job_id: str, leaf: str | None) -> Path:
        return self.job_path(h, job_id) if leaf is None else self.leaf_path(h, job_id, leaf)

    # -- creation and adoption -------------------------------------------------------------

    def _mkdir(self, h: Hierarchy, path: Path) -> None:
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(
                f"cannot create cgroup {path}: {exc.strerror}", path, cause=exc
            ) from exc
        if "cpuset" in h.controllers:
            # A new v1 cpuset has empty cpuset.cpus/mems and refuses tasks (ENOSPC) until
            # they are set; inherit the parent's (cgroup.clone_children would do it only
            # for children created after it is set, and it is not ours to set on parents).
            for name in ("cpuset.cpus", "cpuset.mems"):
                own = path / name
                try:
                    if _read(own).strip():
                        continue
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise CgroupError(f"cannot read {own}: {exc.strerror}", own, cause=exc) from exc
                try:
                    _write(own, _read(path.parent / name).strip() + "\n")
                except OSError as exc:
                    raise CgroupError(f"cannot set {own}: {exc.strerror}", own, cause=exc) from exc

    def _mkdir_leaf(self, h: Hierarchy, job: Path, leaf: str) -> None:
        """Create a (possibly nested) leaf one level at a time (v1 cpuset-aware)."""
        path = job
        for part in leaf.split("/"):
            path = path / part
            self._mkdir(h, path)

    def _enable_controllers(self, path: Path, check_available: bool) -> None:
        """Enable ``v2_controllers`` for the children of *path* (idempotent)."""
        if not self.v2_controllers:
            return
        control = path / "cgroup.subtree_control"
        try:
            enabled = set(_read(control).split())
        except FileNotFoundError:
            enabled = set()
        except OSError as exc:
            raise CgroupError(f"cannot read {control}: {exc.strerror}", control, cause=exc) from exc
        missing = [c for c in self.v2_controllers if c not in enabled]
        if not missing:
            return
        if check_available:
            # The top of our subtree gets its controllers from a parent we do not own:
            # say so clearly instead of surfacing a bare ENOENT from the write below.
            try:
                available = set(_read(path / "cgroup.controllers").split())
            except OSError:
                available = set()
            absent = [c for c in missing if c not in available]
            if absent:
                raise CgroupError(
                    f"cgroup v2 controller(s) {', '.join(absent)} not available in {path}: "
                    "enable them in the parent's cgroup.subtree_control first",
                    path,
                )
        try:
            _write(control, " ".join("+" + c for c in missing))
        except OSError as exc:
            raise CgroupError(
                f"cannot enable {', '.join(missing)} in {control}: {exc.strerror}",
                control,
                cause=exc,
            ) from exc

    def create_job(self, job_id: str, leaves: Sequence[str] = ("main",)) -> None:
        """Create the job's directories (and leaves) in every hierarchy. Idempotent.

        The subtree is created as needed; on v2, ``v2_controllers`` are enabled in each
        directory from the top of the subtree down to the job directory.
        """
        validate_job_id(job_id)
        leaf_names = [_check_leaf(leaf) for leaf in leaves]
        for h in self.hierarchies:
            if not h.mountpoint.is_dir():
                raise CgroupError(f"cgroup hierarchy {h} is not mounted", h.mountpoint)
            path = h.mountpoint
            for i, part in enumerate(self.subtree.split("/")):
                path = path / part
                self._mkdir(h, path)
                if h.version == 2:
                    self._enable_controllers(path, check_available=(i == 0))
            job = self.job_path(h, job_id)
            self._mkdir(h, job)
            if h.version == 2:
                self._enable_controllers(job, check_available=False)
            for leaf in leaf_names:
                self._mkdir_leaf(h, job, leaf)

    def attach(self, job_id: str, pid: int, leaf: str = "main") -> None:
        """Move *pid* into the job's *leaf* in every hierarchy (the leaf is created if
        missing; the job must exist). Raises CgroupError at the first hierarchy that
        refuses; the process then stays where the earlier hierarchies put it."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"invalid pid {pid!r}")
        for h in self.hierarchies:
            job = self.job_path(h, job_id)
            target = self.leaf_path(h, job_id, leaf)
            if not target.is_dir():
                if not job.is_dir():
                    raise CgroupError(f"job {job_id} has no cgroup in {h}", job)
                self._mkdir_leaf(h, job, leaf)
            procs = target / "cgroup.procs"
            try:
                _write(procs, f"{pid}\n")
            except OSError as exc:
                # ESRCH: the process exited; EBUSY/EOPNOTSUPP on v2: target not a leaf or
                # threaded; EACCES: not ours to move (cgroup delegation rules).
                raise CgroupError(
                    f"cannot move pid {pid} into {target}: {exc.strerror}", procs, cause=exc
                ) from exc

    # -- inspection --------------------------------------------------------------------

    @staticmethod
    def _dirs(top: Path) -> Iterator[Path]:
        """*top* and every directory below it, children before parents (for rmdir)."""
        try:
            entries = list(os.scandir(top))
        except (FileNotFoundError, NotADirectoryError):
            return  # Race: removed while we walk (job ending); nothing to report.
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from CgroupLayout._dirs(Path(entry.path))
        yield top

    @staticmethod
    def _procs_in(top: Path) -> set[int]:
        result: set[int] = set()
        for d in CgroupLayout._dirs(top):
            path = d / "cgroup.procs"
            try:
                text = _read(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                # Race: a cgroup removed between listing and reading answers ENODEV
                # (kernfs node already deactivated), not ENOENT.
                if e.errno == errno.ENODEV:
                    continue
                raise
            for lineno, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                if not line.isdigit():
                    raise KernelFormatError(path, lineno, line, "not a pid")
                result.add(int(line))
        return result

    def procs(self, job_id: str, leaf: str | None = None) -> set[int]:
        """Every pid in the job's subtree (or the leaf's), in any hierarchy (missing
        directories are fine)."""
        result: set[int] = set()
        for h in self.hierarchies:
            result |= self._procs_in(self._top(h, job_id, leaf))
        return result

    def existing_jobs(self) -> set[str]:
        """Ids of the jobs that have a ``job_<id>`` directory in any hierarchy.

        Directories whose name is not a valid job id were not made by us and are ignored.
        """
        jobs: set[str] = set()
        for h in self.hierarchies:
            try:
                entries = list(os.scandir(self.subtree_path(h)))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(_JOB_PREFIX) and entry.is_dir(follow_symlinks=False):
                    try:
                        jobs.add(validate_job_id(entry.name[len(_JOB_PREFIX) :]))
                    except InvalidJobId:
                        continue
        return jobs

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        """The job whose v2 subtree contains the cgroup with this id, or None.

        The v2 cgroup id (``cgroup_id()`` in include/linux/cgroup.h, which sock_diag
        reports as INET_DIAG_CGROUP_ID) is the kernfs node id, which is also the inode
        number of the cgroup directory. So: stat the job directories and their
        descendants. The map is cached by inode and rebuilt on a miss; a hit is
        re-checked with one stat, so a removed job is not reported.
        """
        if self._v2 is None or cgroup_id <= 0:
            return None
        hit = self._id_cache.get(cgroup_id)
        if hit is not None:
            try:
                if os.stat(hit[1]).st_ino == cgroup_id:
                    return hit[0]
            except OSError:
                pass
        # A miss is remembered briefly: sockets of processes in no job would otherwise
        # cost a rescan of every job cgroup per question. Never wrong, only slower: the
        # resolver falls back to the fd walk and the process's cgroup path on a miss.
        now = time.monotonic()
        if self._miss_cache.get(cgroup_id, 0.0) > now:
            return None
        cache = self._scan_ids(self._v2)
        self._id_cache = cache  # one assignment: readers in other threads see old or new
        hit = cache.get(cgroup_id)
        if hit is None:
            if len(self._miss_cache) > 4096:
                self._miss_cache = {k: t for k, t in self._miss_cache.items() if t > now}
            self._miss_cache[cgroup_id] = now + _MISS_TTL
            return None
        return hit[0]

    def _scan_ids(self, h: Hierarchy) -> dict[int, tuple[str, Path]]:
        cache: dict[int, tuple[str, Path]] = {}
        try:
            entries = list(os.scandir(self.subtree_path(h)))
        except FileNotFoundError:
            return cache
        for entry in entries:
            if not entry.name.startswith(_JOB_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            job = self.job_for_path(f"/{self.subtree}/{entry.name}")
            if job is None:
                continue  # not a valid job id: not ours
            for d in self._dirs(Path(entry.path)):
                try:
                    cache[os.stat(d).st_ino] = (job, d)
                except FileNotFoundError:
                    continue  # Race: a leaf removed during the scan.
        return cache

    def job_for_path(self, path: str) -> str | None:
        """The job id of a cgroup path ``/<subtree>/job_<id>[/...]``, or None."""
        prefix = f"/{self.subtree}/{_JOB_PREFIX}"
        if not path.startswith(prefix):
            return None
        name = path[len(prefix) :].split("/", 1)[0]
        try:
            return validate_job_id(name)
        except InvalidJobId:
            return None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        """The job named by a ``/proc/<pid>/cgroup`` entry of a configured hierarchy.

        Paths in ``/proc/<pid>/cgroup`` are relative to the reader's cgroup namespace
        root, which is also the root that our mounts show, so they compare directly.
        """
        for entry in entries:
            for h in self.hierarchies:
                if h.version == 2:
                    matches = entry.hierarchy_id == 0 and not entry.controllers
                else:
                    matches = entry.hierarchy_id != 0 and h.controllers <= set(entry.controllers)
                if matches:
                    job = self.job_for_path(entry.path)
                    if job is not None:
                        return job
        return None

    # -- ending ------------------------------------------------------------------------

    def kill(self, job_id: str, timeout: float = 10.0, leaf: str | None = None) -> int:
        """Kill every process of the job (or of one of its leaves), in every hierarchy;
        return how many pids were signalled (best effort: ``cgroup.kill`` does not tell).

        v2: ``cgroup.kill`` (Linux 5.14) kills the whole subtree and races no fork.
        v1 freezer: freeze, SIGKILL every pid, thaw: a frozen task cannot fork a new one
        we would miss. Then, and for every other hierarchy, SIGKILL whatever is listed
        until nothing is left or *timeout* expires (CgroupError).
        """
        validate_job_id(job_id)
        deadline = time.monotonic() + timeout
        signalled: set[int] = set()
        for h in self.hierarchies:
            job = self._top(h, job_id, leaf)
            if not job.is_dir():
                continue
            if h.version == 2:
                kill_file = job / "cgroup.kill"
                if kill_file.exists():
                    members = self._procs_in(job)
                    try:
                        _write(kill_file, "1")
                        signalled |= members
                    except OSError as exc:
                        raise CgroupError(
                            f"cannot kill {job}: {exc.strerror}", kill_file, cause=exc
                        ) from exc
            elif "freezer" in h.controllers:
                signalled |= self._freeze_and_kill(job, deadline)
        while True:
            remaining = self.procs(job_id, leaf)
            if not remaining:
                return len(signalled)
            for pid in remaining:
                signalled.add(pid)
                self._sigkill(pid)
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"job {job_id}: {len(remaining)} process(es) still alive after "
                    f"{timeout:g}s: {sorted(remaining)[:10]}"
                )
            time.sleep(_POLL_S)

    @staticmethod
    def _sigkill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # Race: exited since cgroup.procs was read.

    def _freeze_and_kill(self, job: Path, deadline: float) -> set[int]:
        state = job / "freezer.state"
        try:
            _write_state(state, "FROZEN")
        except OSError:
            return set()  # No freezer here after all: the SIGKILL loop does the work.
        try:
            # FREEZING until every task has stopped (Documentation/admin-guide/
            # cgroup-v1/freezer-subsystem.rst); killing before that could miss a fork.
            while _read(state).strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            members = self._procs_in(job)
            for pid in members:
                self._sigkill(pid)
            return members
        except OSError as exc:
            # Race: the group was removed meanwhile (the whole job ended and was swept:
            # ENOENT, or ENODEV while the kernel deactivates it). Nothing is left in it.
            if exc.errno in _GONE:
                return set()
            raise
        finally:
            # SIGKILL is delivered when the task thaws; never leave the job frozen.
            try:
                _write_state(state, "THAWED")
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise CgroupError(
                        f"cannot thaw {job}: {exc.strerror}", state, cause=exc
                    ) from exc

    def remove(self, job_id: str, leaf: str | None = None) -> None:
        """rmdir the job's directories (or a leaf's), children first, in every hierarchy.

        Missing directories are fine (idempotent). A directory that still holds
        processes (EBUSY) or anything else that refuses raises CgroupError.
        """
        for h in self.hierarchies:
            for d in self._dirs(self._top(h, job_id, leaf)):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise CgroupError(
                        f"cannot remove cgroup {d}: {exc.strerror}", d, cause=exc
                    ) from exc
        if leaf is None:
            self._id_cache = {k: v for k, v in self._id_cache.items() if v[0] != job_id}


def _write_state(path: Path, state: str) -> None:
    # freezer.state exists in real v1 freezer cgroups: never create it (O_CREAT) on a
    # real hierarchy. In a fake tree the test creates it.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, state.encode())
    finally:
        os.close(fd)
