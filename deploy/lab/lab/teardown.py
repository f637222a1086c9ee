"""Teardown: ``down`` stops the lab's daemons by pid file, kills whatever is left in its
cgroups, unmounts, removes its cgroups, network namespaces and state dir (keeping logs/),
and, as the last instance down, what labs share on the machine. It also cleans up after a
failed or interrupted ``up``, and keeps going past a step that fails.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .daemons import Steps
from .errors import LabError
from .host import UMOUNT, is_mount, mountinfo, run_host
from .instances import (
    LOCK_FILE,
    SHARED_FILE,
    live_instances,
    load_shared,
    machine_lock,
    read_owner,
    save_shared,
)
from .network import NETNS_DIR
from .nodes import NodesMixin
from .syslog import SyslogMixin

log = logging.getLogger("lab")


class TeardownMixin(NodesMixin, SyslogMixin):
    """``down`` and the pieces it is made of."""

    def down(self, purge: bool = False) -> None:
        """Tear everything down, also after a partial ``up``; idempotent.

        Keeps ``<dir>/logs`` unless ``purge``. If another live lab of the same name owns
        the name, only this dir's files are cleaned and its resources are left alone. The
        last instance down also removes what labs share on the machine.
        """
        self._require_root()
        t0 = time.monotonic()
        state = self._load_state()
        mine = self._owns_name()
        step = Steps()
        if mine:
            self._stop_everything(state, step)
        step("unmount", self._unmount_dir)
        if mine:
            step("global teardown", self._teardown_global)
            with machine_lock():
                step("machine-wide teardown", self._release_machine)
        step("remove state dir", self._remove_dir, purge)
        for pid in list(self._children):
            self._reap(pid)
        if step.errors:
            raise LabError("down left things behind:\n  " + "\n  ".join(step.errors))
        log.info("lab %s down at %s (%.2f s)", self.name, self.dir, time.monotonic() - t0)

    def _stop_everything(self, state: Mapping[str, Any], step: Steps) -> None:
        """The syslog listener (handed over if others are up), the daemons by pid file in
        reverse start order, the black holes, and then whatever still runs in the lab."""
        with machine_lock():
            step("syslog listener", self._release_logger)
        for kind in reversed(self.daemons):
            kind.stop(step)
        for node in state.get("blackholes", {}):
            if node in self.nodes and self.netns_path(node).exists():
                step(f"nft table in {node}", self._apply_blackholes, node, [])
        step("kill leftover lab processes", self._kill_cgroups)

    def _leftovers(self) -> bool:
        if any(self.cgroup(h).exists() for h in self.hierarchies):
            return True
        return any(self._is_my_netns(n) for n in self._netns_names())

    def _teardown_global(self) -> None:
        """Kill this lab's processes, remove its cgroups and network namespaces."""
        self._kill_cgroups()
        errors = self._remove_cgroups() + self._delete_netns()
        if errors:
            raise LabError("; ".join(errors))

    def _unmount_dir(self) -> None:
        """Unmount everything mounted at or below the state dir, deepest first."""
        prefix = str(self.dir) + "/"
        targets = [m[0] for m in mountinfo() if m[0] == str(self.dir) or m[0].startswith(prefix)]
        for t in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
            while is_mount(t):  # a path can carry several stacked mounts
                r = run_host([UMOUNT, t], check=False)
                if r.returncode != 0:
                    r = run_host([UMOUNT, "-l", t], check=False)
                    if r.returncode != 0:
                        raise LabError(f"umount {t}: {r.stderr.strip()}")

    def _remove_dir(self, purge: bool) -> None:
        if not self.dir.is_dir():
            return
        if any(m[0].startswith(str(self.dir) + "/") for m in mountinfo()):
            raise LabError(f"mounts remain under {self.dir}: not removing it")
        for entry in self.dir.iterdir():
            if entry.name == "logs" and not purge:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if purge:
            self.dir.rmdir()

    # ------------------------------------------------- machine-wide things

    def _release_machine(self) -> None:
        """Under the machine lock: give up the name; the last lab down removes the shared
        things (the /dev/log listener, mount-point dirs, /run/sshd, /run/netns)."""
        shared = load_shared()
        before = dict(shared)
        self._merge_owner_record(shared)
        with contextlib.suppress(FileNotFoundError):
            self.owner_file.unlink()
        if live_instances():
            if shared != before:
                save_shared(shared)
            return
        self._remove_shared(shared)

    def _merge_owner_record(self, shared: dict[str, Any]) -> None:
        """Owner files from before instances recorded the shared dirs themselves."""
        owner = read_owner(self.name) or {}
        created = list(shared.get("created_dirs", []))
        for d in owner.get("created_dirs", []):
            if d not in created:
                created.append(d)
        if owner.get("created_netns_dir"):
            shared["created_netns_dir"] = True
        if created:
            shared["created_dirs"] = created

    def _remove_shared(self, shared: Mapping[str, Any]) -> None:
        """The last lab down: remove everything labs created on the machine."""
        dl = shared.get("devlog")
        if dl:  # a listener left by an instance that is gone
            self._stop_logger(dl)
        if shared.get("created_netns_dir") and NETNS_DIR.is_dir() and not self._netns_names():
            while is_mount(NETNS_DIR):
                if run_host([UMOUNT, str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        errors = _remove_created_dirs(shared.get("created_dirs", []))
        with contextlib.suppress(FileNotFoundError):
            SHARED_FILE.unlink()
        with contextlib.suppress(FileNotFoundError):
            LOCK_FILE.unlink()  # we hold it: waiters notice the new inode and retry
        if errors:
            raise LabError("; ".join(errors))


def _remove_created_dirs(created: list[str]) -> list[str]:
    """rmdir the dirs labs created on the host, last first; a dir that is not empty
    (someone else put something there) stays."""
    errors = []
    for d in reversed(created):
        with contextlib.suppress(FileNotFoundError):
            try:
                Path(d).rmdir()
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    errors.append(f"rmdir {d}: {e}")
                else:
                    log.warning("%s (created by the lab) is not empty: left in place", d)
    return errors
