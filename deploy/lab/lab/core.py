"""The Lab class: the parts of the package put together, the kinds of daemon it runs
(``Lab.DAEMON_KINDS``), and the order of ``up``; plus ``status``.

Each part is a mixin in a module of its own (instances, cgroups, network, nodes, daemons,
munge, agent, sshd, syslog, teardown); ``Lab`` adds only what needs all of them.
"""

from __future__ import annotations

import logging
import os
import pwd
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from .agent import Agent, AgentMixin
from .daemons import DaemonKind
from .errors import LabError
from .host import (
    ENV,
    IP,
    MOUNT,
    NSENTER,
    SETPRIV,
    UMOUNT,
    UNSHARE,
    USERADD,
    is_mount,
    run_host,
)
from .instances import (
    DEFAULT_NAME,
    check_name,
    live_instances,
    load_shared,
    machine_lock,
    read_owner,
    save_shared,
)
from .munge import Munged, MungeMixin
from .network import NETNS_DIR
from .slurm import Slurm, SlurmMixin
from .sshd import Sshd, SshdMixin
from .teardown import TeardownMixin

log = logging.getLogger("lab")

LAB_USERS = ("alice", "bob")
LAB_USER_GECOS = "callerid-adopt lab user"
#: What every lab needs, whatever daemons it runs.
BASE_TOOLS = (NSENTER, UNSHARE, SETPRIV, ENV, IP, MOUNT, UMOUNT, USERADD)
#: The state dir's own subdirs (the daemon kinds add theirs).
STATE_SUBDIRS = ("ns", "nodes", "run", "pids", "logs")


class Lab(TeardownMixin, SshdMixin, AgentMixin, SlurmMixin, MungeMixin):
    """A multi-node lab in state dir ``dir``. See deploy/lab/README.md for the layout."""

    #: The kinds of daemon, in start order (``down`` stops them in reverse). munged first:
    #: the agents need it. sshd before the agents: the sshd start while the agents do.
    #: Slurm (``up(slurm=True)`` only) last: slurmctld starts while the others wait.
    DAEMON_KINDS: ClassVar[tuple[type[DaemonKind[Any]], ...]] = (Munged, Sshd, Agent, Slurm)

    @classmethod
    def load(cls, dir: str | Path | None = None, name: str | None = None) -> Lab:
        """The lab described by ``<dir>/lab.json`` (written by ``up``); defaults if absent.

        Without ``dir``, the dir of lab ``name`` if it is up, else its default dir.
        """
        if dir is None and name is not None:
            owner = read_owner(check_name(name))
            dir = owner.get("dir") if owner else None
        lab = cls(dir, name=name or DEFAULT_NAME)
        state = lab._load_state()
        if state:
            lab = cls(lab.dir, int(state.get("nodes", 2)), state.get("venv"),
                      bool(state.get("agents", True)),
                      name=str(state.get("name") or name or DEFAULT_NAME),
                      sshd=bool(state.get("sshd", False)),
                      slurm=bool(state.get("slurm", False)))
        return lab

    def __enter__(self) -> Lab:
        self.up(agents=self.agents, sshd=self.sshd, slurm=self.slurm)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # -------------------------------------------------------------------- up

    def up(self, agents: bool = True, sshd: bool = True, slurm: bool = False) -> None:
        """Build the lab (idempotent: a lab already up in this dir is rebuilt).

        ``slurm``: also run Slurm (slurmctld on the head, a slurmd per node; slurm.py); the
        agents then use their Slurm backend (`backend = "slurm"`).

        On any failure everything already built is torn down before the error propagates.
        """
        self._require_root()
        self.agents, self.sshd, self.slurm = agents, sshd, slurm   # the agents' config reads them
        state: dict[str, Any] = {
            "state": "starting", "name": self.name, "nodes": len(self.nodes),
            "venv": str(self.venv), "agents": agents, "sshd": sshd, "slurm": slurm,
        }
        kinds = [k for k in self.daemons if k.present(state)]
        self._check_tools(kinds)
        t0 = time.monotonic()
        self._take_name(state)
        try:
            self._build(state, kinds)
        except BaseException:
            log.error("lab up failed: tearing down")
            try:
                self.down()
            except Exception:  # keep the original error visible
                log.exception("down after a failed up also failed")
            raise
        log.info("lab %s up at %s: %s (%.2f s)", self.name, self.dir, ", ".join(self.nodes),
                 time.monotonic() - t0)

    @staticmethod
    def _check_tools(kinds: Sequence[DaemonKind[Any]]) -> None:
        missing = [t for t in BASE_TOOLS if not os.path.isabs(t)]
        for kind in kinds:
            missing += kind.missing()
        if missing:
            raise LabError(f"missing tools {missing}: run deploy/install-deps.sh")

    def _take_name(self, state: Mapping[str, Any]) -> None:
        """Claim the name for this dir, taking down first what holds it (this dir half
        up, or stale leftovers of this name elsewhere)."""
        for _ in range(3):
            with machine_lock():
                stale = self._claim(state)
            if stale is None:
                return
            if stale == self.dir:
                log.info("the lab at %s is already up or half up: tearing it down first",
                         self.dir)
                Lab.load(self.dir).down()
            else:
                log.warning("taking over leftovers of a stale lab %s at %s", self.name, stale)
                Lab(stale, name=self.name).down()
        raise LabError(f"could not take {self.owner_file}")

    def _build(self, state: dict[str, Any], kinds: Sequence[DaemonKind[Any]]) -> None:
        """Everything ``up`` builds, once the name is ours; lab.json says how far it got."""
        with machine_lock():
            # Leftovers nobody owns (a crash before the owner file existed) are ours.
            if self._leftovers():
                log.warning("clearing leftovers of an earlier lab %s", self.name)
                self._release_logger()
                self._teardown_global()
            self._ensure_shared(kinds)
            self._ensure_users()
        self._make_dirs(kinds)
        self._save_state(state)
        self._make_cgroups()
        with machine_lock():
            state["syslog"] = self._ensure_logger()
        self._save_state(state)
        for kind in kinds:
            kind.prepare()
        self._make_network()
        self._make_nodes(kinds)
        started = [k for k in kinds if k.autostart(state)]
        for kind in started:
            kind.start()
        for kind in started:
            kind.wait()
        state["state"] = "up"
        self._save_state(state)

    def _ensure_shared(self, kinds: Sequence[DaemonKind[Any]]) -> None:
        """Under the machine lock: host-side dirs the nodes need, recorded as shared."""
        shared = load_shared()
        created: list[str] = shared.setdefault("created_dirs", [])
        if not NETNS_DIR.exists():
            shared["created_netns_dir"] = True
        needed = [t for _, t in self._mount_points(self.nodes[0], kinds)]
        for kind in kinds:
            needed += kind.host_dirs()
        for target in needed:
            if not target.exists():
                if str(target) not in created:
                    created.append(str(target))
                save_shared(shared)  # before creating it: a failure must still undo it
                target.mkdir(mode=0o755, parents=True)
        save_shared(shared)

    @staticmethod
    def _ensure_users() -> None:
        """alice and bob, created if missing and kept at down (they may own files)."""
        for user in LAB_USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                log.info("creating user %s", user)
                run_host([USERADD, "-m", "-s", "/bin/bash", "-c", LAB_USER_GECOS, user])

    def _make_dirs(self, kinds: Sequence[DaemonKind[Any]]) -> None:
        d = self.dir
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged (and sshd's StrictModes) check every parent of its files
        for sub in STATE_SUBDIRS:
            (d / sub).mkdir(mode=0o755, exist_ok=True)
        for old in (d / "logs").iterdir():  # a fresh run gets fresh logs
            if old.is_file():
                old.unlink()
        # ns/ must be a private mount to hold mount-namespace files (else EINVAL).
        if not is_mount(d / "ns"):
            run_host([MOUNT, "--bind", str(d / "ns"), str(d / "ns")])
        run_host([MOUNT, "--make-private", str(d / "ns")])
        self._make_node_dirs()
        for kind in kinds:
            kind.make_dirs()

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """What is up: nodes, addresses, daemons and whether they are alive."""
        state = self._load_state()
        dl = load_shared().get("devlog") or {}
        out: dict[str, Any] = {
            "name": self.name,
            "dir": str(self.dir),
            "state": state.get("state", "down"),
            "owner": (read_owner(self.name) or {}).get("dir"),
            "instances": {n: str(d) for n, d in live_instances().items()},
        }
        for kind in self.daemons:
            out.update(kind.status(state))
        out["syslog"] = {"mode": state.get("syslog"), "listener_owner": dl.get("name")}
        out["blackholes"] = state.get("blackholes", {})
        out["nodes"] = {node: self._node_status(node, state) for node in self.nodes}
        return out

    def _node_status(self, node: str, state: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"ipv4": self.ip(node), "ipv6": self.ip(node, 6),
                               "netns": self.netns_path(node).exists()}
        for kind in self.daemons:
            out.update(kind.node_status(node, state))
        return out
