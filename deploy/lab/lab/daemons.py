"""The lab's daemons: ``DaemonKind``, the seam where one kind of daemon (munged, the node
agent, sshd, slurmctld/slurmd; later perhaps a broker) plugs into ``up``, ``down`` and
``status``, and the process handling they share: start with a pid file, stop by pid file
(only a pid that still sits in the lab's cgroups), reap.

Adding a kind of daemon is one module: a ``DaemonKind`` subclass (and, if it gives the
Lab methods of its own, a mixin beside it, like ``agent.AgentMixin``), listed in
``Lab.DAEMON_KINDS`` (core.py) at its place in the start order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from .cgroups import CgroupsMixin, pid_in_lab
from .host import PATH, pid_alive, read_pid, write_file

log = logging.getLogger("lab")

STOP_TIMEOUT = 10.0
#: How long ``down`` waits for a daemon after SIGTERM before it sends SIGKILL.
DOWN_TIMEOUT = 5.0


class Steps:
    """Runs the steps of a teardown: a step that fails is logged and recorded, and the
    next one still runs (tear down as much as possible)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # keep going: tear down as much as possible
            log.error("down: %s: %s", what, e)
            self.errors.append(f"{what}: {e}")


L = TypeVar("L", bound="ProcessesMixin")


class DaemonKind(Generic[L]):
    """One kind of daemon the lab runs: what ``up``, ``down`` and ``status`` ask of it.

    ``up`` asks every kind ``present`` in the lab (lab.json's options decide), in
    ``Lab.DAEMON_KINDS`` order: ``tools`` (checked before anything is built),
    ``host_dirs`` (mount points it needs on the host, made and shared by all instances),
    ``mounts`` (its bind mounts in each node), ``make_dirs`` (its files in the state dir),
    ``prepare`` (before the network exists: may start slow work in the background); then,
    with the network and the nodes up, ``start`` for each kind that starts with the lab
    (``autostart``), in order, and last ``wait`` for each. A kind that others need (munged)
    waits inside ``start``. ``down`` calls ``stop`` in reverse order, ``status`` asks
    ``status`` and ``node_status``. Every method but ``name`` has a default that does nothing.
    """

    #: How status() and the logs call it.
    name: ClassVar[str] = "daemon"

    def __init__(self, lab: L) -> None:
        self.lab = lab

    def present(self, state: Mapping[str, Any]) -> bool:
        """Whether a lab built with these options (lab.json) has this kind at all."""
        return True

    def autostart(self, state: Mapping[str, Any]) -> bool:
        """Whether ``up`` starts it (else it can be started later, as agents are)."""
        return self.present(state)

    def missing(self) -> list[str]:
        """Tools or files it needs that this machine lacks (``up`` refuses then)."""
        return [t for t in self.tools() if not os.path.isabs(t)]

    def tools(self) -> list[str]:
        return []

    def host_dirs(self) -> list[Path]:
        return []

    def mounts(self, node: str) -> list[tuple[Path, Path]]:
        """(source on the host, target inside the node) of the bind mounts it needs."""
        return []

    def make_dirs(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def start(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def pidfiles(self) -> list[Path]:
        """The pid files of what runs of this kind, as ``stop`` finds them."""
        return []

    def stop(self, step: Steps) -> None:
        """Stop every process of this kind by its pid file (SIGTERM, then SIGKILL)."""
        for pf in self.pidfiles():
            step(f"stop {pf.name}", self.lab._stop_pidfile, pf, signal.SIGTERM, True,
                 DOWN_TIMEOUT)

    def status(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Entries of ``Lab.status()`` for the whole lab."""
        return {}

    def node_status(self, node: str, state: Mapping[str, Any]) -> dict[str, Any]:
        """Entries of ``Lab.status()["nodes"][node]``."""
        return {}


class ProcessesMixin(CgroupsMixin):
    """Starting, stopping and reaping the lab's daemons; the daemon kinds of the lab."""

    #: The kinds of daemon of a lab, in start order (set by Lab).
    DAEMON_KINDS: ClassVar[tuple[type[DaemonKind[Any]], ...]] = ()

    @property
    def daemons(self) -> list[DaemonKind[Any]]:
        """One object per kind of daemon, bound to this lab, in start order."""
        if self._daemons is None:
            self._daemons = [kind(self) for kind in self.DAEMON_KINDS]
        return self._daemons

    def _spawn(self, argv: Sequence[str], logfile: Path, pidfile: Path,
               env: Mapping[str, str] | None = None,
               pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """Start a daemon in a session of its own, output to logfile, pid to pidfile."""
        with open(logfile, "ab") as out:
            p = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(env) if env else {"PATH": PATH},
                pass_fds=tuple(pass_fds),
            )
        self._children[p.pid] = p
        write_file(pidfile, f"{p.pid}\n")
        return p

    def _stop_pidfile(self, pidfile: Path, sig: int, wait: bool,
                      timeout: float = STOP_TIMEOUT, name: str | None = None) -> None:
        """Signal the pid in pidfile if it is alive and in a cgroup of lab ``name`` (this
        one by default); with ``wait``, wait ``timeout`` s, then SIGKILL."""
        pid = read_pid(pidfile)
        if pid is None:
            return
        if pid_alive(pid) and pid_in_lab(pid, name or self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if wait and not self._wait_dead(pid, timeout) and sig != signal.SIGKILL:
                log.warning("pid %d (%s) ignored signal %d for %.0f s: SIGKILL", pid,
                            pidfile.name, sig, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_dead(pid, 5)
        elif pid_alive(pid):
            log.warning("%s names pid %d, which is not in a cgroup of lab %s: left alone",
                        pidfile, pid, name or self.name)
        if not wait and pid_alive(pid):
            return
        self._reap(pid)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()

    def _reap(self, pid: int) -> None:
        p = self._children.pop(pid, None)
        if p is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)

    def _wait_dead(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            p = self._children.get(pid)
            if p is not None:
                p.poll()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _live_pid(self, pidfile: Path) -> int | None:
        """The pid in pidfile if it runs and still sits in this lab's cgroups."""
        pid = read_pid(pidfile)
        if pid is None or not pid_alive(pid) or not pid_in_lab(pid, self.name):
            return None
        return pid
