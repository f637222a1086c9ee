"""The node agent in the lab: its config (agent.toml, seen in the node as
/etc/callerid-adopt/agent.toml), its dirs bound over /etc, /run and /var/lib/callerid-adopt
in the node, starting agents and waiting for their sd_notify READY=1, stopping them by
pid file. ``Agent`` is the daemon kind; ``AgentMixin`` the Lab's methods for agents.

Agents are ``<venv>/bin/node-agent --config /etc/callerid-adopt/agent.toml``, run inside
their node with a clean environment plus ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .daemons import DaemonKind, ProcessesMixin
from .errors import LabError
from .host import REPO, tail, write_file
from .network import AGENT_PORT, METRICS_PORT
from .nodes import NodesMixin
from .sshd import pam_service_name

log = logging.getLogger("lab")

#: The v1 list written into agent.toml (same order as the spec's example).
AGENT_V1 = ("freezer", "cpuacct", "pids")
AGENT_READY_TIMEOUT = 30.0
#: The node's own dirs (under nodes/<node>/) and where the node sees them.
AGENT_DIRS = (("etc", "/etc/callerid-adopt", 0o755), ("run", "/run/callerid-adopt", 0o755),
              ("state", "/var/lib/callerid-adopt", 0o700))


class AgentMixin(NodesMixin, ProcessesMixin):
    """Start, stop and watch the node agents."""

    def agent_config(self, node: str) -> str:
        """The agent.toml the lab writes for ``node`` (seen there as /etc/callerid-adopt)."""
        v4, v6 = self.ip(node), self.ip(node, 6)
        have = {h.name for h in self.hierarchies}
        v1 = [h for h in AGENT_V1 if h in have]
        slurm = bool(getattr(self, "slurm", False))
        return "\n".join([
            "# written by deploy/lab/lab.py",
            f'node_name = "{node}"',
            f'listen = ["{v4}:{AGENT_PORT}", "[{v6}]:{AGENT_PORT}"]',
            'socket = "/run/callerid-adopt/agent.sock"',
            f"port = {AGENT_PORT}",
            'state_dir = "/var/lib/callerid-adopt"',
            "admin_uids = []",
            'log_level = "debug"',
            f'login_services = ["{pam_service_name(node)}"]',
            # loopback only: the metrics say who logs in where; other nodes need not see them
            f'metrics_listen = "127.0.0.1:{METRICS_PORT}"',
            # With Slurm in the lab the agents take Slurm's jobs (its slurm.conf is the
            # lab's, bound at /etc/slurm in the node); else the native registry's.
            f'backend = "{"slurm" if slurm else "native"}"',
            # Every node of the lab: where the CLIs look for a job (node_agent/cli/locate.py).
            f'nodes = "{self.nodeset()}"',
            "",
            "[munge]",
            'socket = "/run/munge/munge.socket.2"',
            "",
            "[cgroup]",
            'mount_root = "/sys/fs/cgroup"',
            "v1 = [" + ", ".join(f'"{h}"' for h in v1) + "]",
            f"v2 = {'true' if 'unified' in have else 'false'}",
            "v2_controllers = []",
            'subtree = "callerid"',
            "",
            *([] if not slurm else ["[slurm]", f'nodename = "{node}"', ""]),
        ])

    def nodeset(self) -> str:
        """The lab's nodes in the hostlist syntax of agent.toml's `nodes`: node[1-3]."""
        n = len(self.nodes)
        return "node1" if n == 1 else f"node[1-{n}]"

    def _compile_checkout(self) -> None:
        """Byte-compile the checkout's packages, as an installed package has them.

        Lab users (alice, bob) cannot write ``__pycache__`` in the root-owned checkout, so
        without this every ``ssh-to-job`` or ``adoptctl`` they start would compile its
        modules from source first (~17 ms for ssh-to-job), which a site's install never
        does. Only stale or missing files are written."""
        argv = [str(self.venv / "bin" / "python"), "-m", "compileall", "-q",
                *(str(REPO / pkg) for pkg in ("callerid", "node_agent"))]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log.warning("byte-compiling the checkout failed: %s", (r.stdout + r.stderr)[-500:])

    def _agent_pidfile(self, node: str) -> Path:
        return self.dir / "pids" / f"agent-{node}.pid"

    def _agent_logfile(self, node: str) -> Path:
        return self.dir / "logs" / f"agent-{node}.log"

    def _notify_path(self, node: str) -> Path:
        return self.dir / "run" / f"notify-{node}.sock"

    def agent_start(self, node: str) -> None:
        """Start the node agent in ``node`` and wait (30 s) for its sd_notify READY=1."""
        self.agents_start([node])

    def agents_start(self, nodes: Sequence[str]) -> None:
        """Start the agents of ``nodes`` together, then wait for each one's READY=1.

        Each agent gets ``NOTIFY_SOCKET=<dir>/run/notify-<node>.sock``, a datagram socket
        the lab binds (the sd_notify protocol; the path is visible inside the node, and
        AF_UNIX path sockets work across network namespaces). The socket is removed once
        READY=1 arrived: later notifications fail on the agent's side and must be ignored
        there, as sd_notify(3) does outside systemd. On failure the message carries the tail
        of ``logs/agent-<node>.log``; an agent that never got ready is killed.
        """
        self._require_root()
        self._require_state()
        exe = self.venv_bin("node-agent")
        if not os.access(exe, os.X_OK):
            raise LabError(f"{exe} not found: build the venv (make venv) or pass --venv")
        for node in nodes:
            self.index(node)
            if self.agent_pid(node) is not None:
                raise LabError(f"the agent of {node} already runs (pid {self.agent_pid(node)})")
        socks: dict[str, socket.socket] = {}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for node in nodes:
                socks[node] = self._notify_socket(node)
                procs[node] = self._spawn_agent(node, exe)
            self._wait_ready(socks, procs)
        finally:
            for node, sock in socks.items():
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    self._notify_path(node).unlink()

    def _notify_socket(self, node: str) -> socket.socket:
        notify = self._notify_path(node)
        with contextlib.suppress(FileNotFoundError):
            notify.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(notify))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _spawn_agent(self, node: str, exe: str) -> subprocess.Popen[bytes]:
        logf = self._agent_logfile(node)
        with open(logf, "ab") as f:
            f.write(f"--- lab: starting agent {time.strftime('%F %T')}\n".encode())
        argv = self.cmd(node, [exe, "--config", "/etc/callerid-adopt/agent.toml"],
                        env={"NOTIFY_SOCKET": str(self._notify_path(node))})
        return self._spawn(argv, logf, self._agent_pidfile(node))

    def _wait_ready(self, socks: Mapping[str, socket.socket],
                    procs: Mapping[str, subprocess.Popen[bytes]]) -> None:
        """Wait for READY=1 from every agent; LabError (with its log) for one that exits
        or stays silent for AGENT_READY_TIMEOUT."""
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        waiting = set(procs)
        while waiting:
            for node in sorted(waiting):
                if self._got_ready(socks[node]):
                    log.info("agent %s ready (pid %d)", node, procs[node].pid)
                    waiting.discard(node)
                    continue
                why = self._not_ready(node, procs[node], deadline)
                if why is not None:
                    logf = self._agent_logfile(node)
                    raise LabError(f"agent on {node} {why}; tail of {logf}:\n{tail(logf)}")
            if waiting:
                time.sleep(0.01)

    def _not_ready(self, node: str, p: subprocess.Popen[bytes], deadline: float) -> str | None:
        """Why the agent of node will not get ready (killing it past the deadline); None
        while it may still."""
        if p.poll() is not None:
            return f"exited with rc={p.returncode}"
        if time.monotonic() > deadline:
            self.agent_stop(node, signal.SIGKILL)
            return f"sent no READY=1 within {AGENT_READY_TIMEOUT:.0f} s"
        return None

    @staticmethod
    def _got_ready(sock: socket.socket) -> bool:
        while True:
            try:
                msg = sock.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return False
            if "READY=1" in msg.splitlines():
                return True

    def agent_pid(self, node: str) -> int | None:
        """The agent's pid if it runs (pid file + alive + still in a lab cgroup)."""
        return self._live_pid(self._agent_pidfile(node))

    def agent_stop(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        """Signal the agent by its pid file; with ``wait``, wait (10 s, then SIGKILL)."""
        self._stop_pidfile(self._agent_pidfile(node), sig, wait)

    def agent_log(self, node: str) -> str:
        try:
            return self._agent_logfile(node).read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Agent(DaemonKind[AgentMixin]):
    """The node agent: one per node. Its dirs and config are always made; ``up`` starts
    the agents unless ``agents=False`` (then ``agent_start`` does, later)."""

    name = "agent"

    def autostart(self, state: Mapping[str, Any]) -> bool:
        return bool(state.get("agents", True))

    def mounts(self, node: str) -> list[tuple[Path, Path]]:
        nd = self.lab.node_dir(node)
        return [(nd / sub, Path(target)) for sub, target, _ in AGENT_DIRS]

    def make_dirs(self) -> None:
        for node in self.lab.nodes:
            nd = self.lab.node_dir(node)
            for sub, _, mode in AGENT_DIRS:
                (nd / sub).mkdir(mode=mode, parents=True, exist_ok=True)
            write_file(nd / "etc" / "agent.toml", self.lab.agent_config(node))

    def prepare(self) -> None:
        self.lab._compile_checkout()

    def start(self) -> None:
        self.lab.agents_start(self.lab.nodes)

    def pidfiles(self) -> list[Path]:
        pids = self.lab.dir / "pids"
        return sorted(pids.glob("agent-*.pid")) if pids.is_dir() else []

    def node_status(self, node: str, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"agent_pid": self.lab.agent_pid(node)}
