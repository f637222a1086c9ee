"""Pre-pay the kernel's toll for moving a process between cgroups.

Writing a pid to `cgroup.procs` takes the kernel's global cgroup_threadgroup_rwsem for
writing (kernel/cgroup/cgroup.c, cgroup_attach_lock). After a quiet spell that lock is
in its fast-reader mode, and the first writer waits for an RCU grace period to switch
it (rcu_sync_enter): measured 5-15 ms on the test machines, every adoption after a
pause. Later writers within about a grace period find it already switched and take
microseconds.

When a login needs a caller-ID call to the source node (a millisecond or more), the
agent starts that switch at the same time, by moving a helper process of its own
between two cgroups of its own; the real adoption then follows on a warm lock. The
helper is a `sleep` in `<subtree>/.warmup/{a,b}` of the first configured hierarchy.
Nothing outside the agent's subtree is touched. (Mounting cgroup2 with `favordynmods`
keeps the lock switched for good, at some cost to every fork; that is the site's call,
not the agent's.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

from callerid import CgroupLayout

log = logging.getLogger("node_agent.warmup")

DIR = ".warmup"


class MigrationWarmer:
    def __init__(self, layout: CgroupLayout) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._dirs: list[Path] = []
        self._turn = 0
        if not layout.hierarchies:
            return
        h = layout.hierarchies[0]
        top = layout.subtree_path(h) / DIR
        try:
            self._clear(top)
            self._dirs = [top / "a", top / "b"]
            for d in self._dirs:
                d.mkdir(parents=True, exist_ok=True)
            self._proc = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
            (self._dirs[0] / "cgroup.procs").write_text(str(self._proc.pid))
        except OSError as e:
            log.warning("migration warm-up disabled: %s", e)
            self.close()

    @staticmethod
    def _clear(top: Path) -> None:
        """Remove what a previous agent (killed before it could clean up) left."""
        for d in (top / "a", top / "b"):
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kick(self) -> None:
        """Start switching the lock now, in the background; never blocks the caller."""
        if self._proc is None:
            return
        with self._lock:
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._move, name="cgroup-warmup", daemon=True).start()

    def _move(self) -> None:
        try:
            assert self._proc is not None
            self._turn ^= 1
            (self._dirs[self._turn] / "cgroup.procs").write_text(str(self._proc.pid))
        except OSError as e:
            log.debug("warm-up move failed: %s", e)
        finally:
            with self._lock:
                self._busy = False

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        for d in self._dirs:
            try:
                d.rmdir()
            except OSError:
                pass
        if self._dirs:
            try:
                self._dirs[0].parent.rmdir()
            except OSError:
                pass
