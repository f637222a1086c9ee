"""MUNGE for the lab: one munged (user munge, ``--origin`` the head's address) in the head
network namespace, its socket shared with every node through a bind mount over
/run/munge. A daemon kind (``Munged``) that the other kinds wait for: agents need it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .daemons import DaemonKind, ProcessesMixin
from .errors import LabError
from .host import ENV, MUNGED, MUNGEKEY, PATH, SETPRIV, pid_alive, read_pid, run_host, tail
from .instances import HEAD
from .nodes import NodesMixin

MUNGE_TIMEOUT = 10.0


class MungeMixin(NodesMixin, ProcessesMixin):
    """The lab's munged."""

    @property
    def munge_socket(self) -> Path:
        """The munged socket as seen on the host; nodes see it as /run/munge/munge.socket.2."""
        return self.dir / "munge" / "run" / "munge.socket.2"

    def _prepare_munge_files(self) -> tuple[Path, Path]:
        """Key, log file and dirs owned by munge with the modes munged insists on."""
        md = self.dir / "munge"
        run = md / "run"
        mu = pwd.getpwnam("munge")
        key = md / "munge.key"
        if not key.exists():
            run_host([MUNGEKEY, "--create", f"--keyfile={key}"])
        logf = self.dir / "logs" / "munged.log"
        logf.touch()
        for path in (md, run, key, logf):
            os.chown(path, mu.pw_uid, mu.pw_gid)
        os.chmod(md, 0o711)  # munged: the socket path must be searchable by all
        os.chmod(run, 0o755)
        os.chmod(key, 0o600)
        os.chmod(logf, 0o640)
        return key, logf

    def _start_munged(self) -> None:
        """Start munged in the head namespace and wait until its socket exists."""
        key, logf = self._prepare_munge_files()
        md = self.dir / "munge"
        sock = self.munge_socket
        mu = pwd.getpwnam("munge")
        argv = self._enter(HEAD, [f"--net={self.netns_path(HEAD)}"], [
            SETPRIV, f"--reuid={mu.pw_uid}", f"--regid={mu.pw_gid}", "--init-groups", "--",
            ENV, "-i", f"PATH={PATH}", MUNGED, "--foreground",
            f"--key-file={key}", f"--socket={sock}", f"--pid-file={md / 'run' / 'munged.pid'}",
            f"--log-file={logf}", f"--seed-file={md / 'munged.seed'}",
            f"--origin={self.ip(HEAD)}",
        ])
        p = self._spawn(argv, self.dir / "logs" / "munged.out", self.dir / "pids" / "munged.pid")
        deadline = time.monotonic() + MUNGE_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(sock).st_mode):
                    return
            if p.poll() is not None or time.monotonic() > deadline:
                raise LabError(
                    f"munged did not come up (rc={p.poll()}); log:\n{tail(logf)}\n"
                    f"stderr:\n{tail(self.dir / 'logs' / 'munged.out')}"
                )
            time.sleep(0.01)


class Munged(DaemonKind[MungeMixin]):
    """munged: always part of the lab, started first, ready before the next kind starts."""

    name = "munged"

    def tools(self) -> list[str]:
        return [MUNGED, MUNGEKEY]

    def mounts(self, node: str) -> list[tuple[Path, Path]]:
        return [(self.lab.dir / "munge" / "run", Path("/run/munge"))]

    def make_dirs(self) -> None:
        (self.lab.dir / "munge" / "run").mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.lab._start_munged()

    def pidfiles(self) -> list[Path]:
        return [self.lab.dir / "pids" / "munged.pid"]

    def status(self, state: Mapping[str, Any]) -> dict[str, Any]:
        munged = read_pid(self.lab.dir / "pids" / "munged.pid")
        return {"munged": {"pid": munged, "alive": munged is not None and pid_alive(munged)}}
