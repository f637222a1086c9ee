"""The lab's cgroups: the hierarchies it uses (never ``memory``), its subtree
``<hierarchy>/<name>/`` with one group per node and one for the head, moving a shell into
a group, and finding, killing, thawing and removing whatever is in the subtree.

Only lab processes can be in the subtree, which is what makes "kill everything there"
safe on a shared machine; see README.md, "cgroups".
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .host import mountinfo, pid_alive
from .instances import DEFAULT_NAME, HEAD, Instance

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The hierarchies the lab uses, by their directory under /sys/fs/cgroup. Never "memory".
HIERARCHIES = ("freezer", "pids", "cpuacct", "unified")
#: How long a kill may take before down gives up on a process (it survives SIGKILL).
KILL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy the lab uses, as mounted on the host."""

    name: str  # directory under /sys/fs/cgroup ("freezer", "unified")
    mountpoint: Path
    fstype: str  # "cgroup" or "cgroup2"
    options: str  # v1 super options to mount it again ("freezer", "cpu,cpuacct"); "" for v2

    def lab_root(self, lab: str = DEFAULT_NAME) -> Path:
        """``<hierarchy>/<lab name>``: the subtree of one lab instance."""
        return self.mountpoint / lab

    def group(self, name: str, lab: str = DEFAULT_NAME) -> Path:
        return self.lab_root(lab) / name


def discover_hierarchies(root: Path = CGROUP_ROOT) -> list[Hierarchy]:
    """The lab hierarchies present on this machine (v1 ones may be co-mounted or absent)."""
    mounts = {m[0]: m for m in mountinfo()}
    found = []
    for name in HIERARCHIES:
        path = root / name
        if not path.is_dir():
            continue
        real = os.path.realpath(path)
        m = mounts.get(real)
        if m is None or m[1] not in ("cgroup", "cgroup2"):
            continue
        if m[1] == "cgroup":
            opts = [o for o in m[3].split(",") if o not in ("rw", "ro")]
            if "memory" in opts:  # never, even if co-mounted with a lab controller
                continue
            found.append(Hierarchy(name, Path(real), "cgroup", ",".join(opts)))
        else:
            found.append(Hierarchy(name, Path(real), "cgroup2", ""))
    return found


def pid_in_lab(pid: int, name: str = DEFAULT_NAME) -> bool:
    """True if pid sits in a cgroup of lab ``name``: guards kills against pid reuse."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in text.splitlines():
        path = line.split(":", 2)[2]
        if path == f"/{name}" or path.startswith(f"/{name}/"):
            return True
    return False


class CgroupsMixin(Instance):
    """The lab's cgroup subtree: make it, enter it, empty it, remove it."""

    @property
    def hierarchies(self) -> list[Hierarchy]:
        if self._hier is None:
            self._hier = discover_hierarchies()
        return self._hier

    def cgroup(self, h: Hierarchy, group: str | None = None) -> Path:
        """``<hierarchy>/<name>[/<group>]``: the lab's subtree, or one group of it."""
        root = h.lab_root(self.name)
        return root / group if group else root

    def _move_self(self, group: str) -> str:
        """Shell text that moves the shell into ``<name>/<group>`` of every lab hierarchy."""
        procs = [self.cgroup(h, group) / "cgroup.procs" for h in self.hierarchies]
        return " && ".join(f"echo $$ >{shlex.quote(str(p))}" for p in procs) or ":"

    def _make_cgroups(self) -> None:
        if not self.hierarchies:
            raise LabError(f"none of the cgroup hierarchies {HIERARCHIES} is mounted")
        for h in self.hierarchies:
            for group in [HEAD, *self.nodes]:
                self.cgroup(h, group).mkdir(parents=True, exist_ok=True)

    def _lab_cgroups(self) -> list[Path]:
        """Every cgroup dir under <name>/ in each lab hierarchy, deepest first."""
        out: list[Path] = []
        for h in self.hierarchies:
            root = self.cgroup(h)
            if root.is_dir():
                for r, dirs, _ in os.walk(root):
                    out += [Path(r) / d for d in dirs]
                out.append(root)
        return sorted(out, key=lambda p: len(p.parts), reverse=True)

    def _lab_pids(self) -> set[int]:
        pids: set[int] = set()
        for cg in self._lab_cgroups():
            with contextlib.suppress(FileNotFoundError):
                pids.update(int(x) for x in (cg / "cgroup.procs").read_text().split())
        return pids

    def _kill_cgroups(self) -> None:
        """Kill everything still in the lab's cgroups: only lab processes can be there."""
        for h in self.hierarchies:
            kill = self.cgroup(h) / "cgroup.kill"
            if h.fstype == "cgroup2" and kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            left = {p for p in self._lab_pids() if pid_alive(p)}
            if not left:
                break
            for pid in left:  # v1-only stragglers, or no cgroup.kill on this kernel
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._thaw_v1()  # a task in a frozen v1 freezer cgroup never sees its SIGKILL
            for pid in list(self._children):
                self._children[pid].poll()
            if time.monotonic() > deadline:
                raise LabError(f"processes survive SIGKILL in the lab cgroups: {sorted(left)}")
            time.sleep(0.01)

    def _thaw_v1(self) -> None:
        """Thaw every frozen v1 freezer cgroup of the lab (e.g. a job the agent froze)."""
        for cg in self._lab_cgroups():
            self_freezing = cg / "freezer.self_freezing"
            with contextlib.suppress(FileNotFoundError, OSError):
                if self_freezing.read_text().strip() == "1":
                    (cg / "freezer.state").write_text("THAWED")

    def _remove_cgroups(self) -> list[str]:
        """rmdir the (emptied) subtree depth-first; returns what could not be removed."""
        errors = []
        for cg in self._lab_cgroups():
            for attempt in range(100):  # v1 may answer EBUSY for a moment after the kill
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or attempt == 99:
                        errors.append(f"rmdir {cg}: {e}")
                        break
                    time.sleep(0.01)
        return errors
