#!/usr/bin/python3
"""The callerid-adopt multi-node lab: N "nodes" on one Linux machine, built from namespaces.

The demo, the integration tests and the benchmarks run on this lab. It is stdlib-only
(Debian's /usr/bin/python3 or the project venv), root-only, importable
(``sys.path.insert(0, "<repo>/deploy/lab"); import lab``) and a CLI (``lab.py --help``).

Layout
------
Network (``ip``)::

    netns cidlab-head    bridge cidbr0  10.77.0.1/24  fd77::1/64      (munged runs here)
      |- veth-node1 <==> netns cidlab-node1  eth0  10.77.0.11/24  fd77::11/64
      |- veth-node2 <==> netns cidlab-node2  eth0  10.77.0.12/24  fd77::12/64
      ...

  The veth peers are created directly inside the namespaces, IPv6 addresses carry
  ``nodad`` (usable at once), the bridge has STP and multicast snooping off (ports forward
  at once). No lab namespace has a default route: nothing can leave the machine.

A node ``nodeI`` = its network namespace + UTS (hostname ``nodeI``) + mount + cgroup
namespace. The last three are persisted as nsfs bind mounts in ``<dir>/ns/nodeI/`` (a
private bind mount, which the kernel requires to hold a mount-namespace file) and are made by
``unshare`` run from a shell that first moved itself into ``cidlab/nodeI`` of every lab
hierarchy, so the node's cgroup namespace is rooted at its own subtree. Inside the node's
mount namespace the lab

* unmounts and mounts again each lab cgroup hierarchy (mounting over one gives EBUSY),
  so ``/sys/fs/cgroup/<h>`` shows only the node's subtree;
* bind-mounts ``<dir>/hosts`` over ``/etc/hosts`` (lab names never reach DNS),
  ``nodes/nodeI/{etc,run,state}`` over ``/etc/callerid-adopt``, ``/run/callerid-adopt``,
  ``/var/lib/callerid-adopt``, and ``<dir>/munge/run`` over ``/run/munge``;
* detaches ``<dir>/ns`` and ``/run/netns`` so a node holds no references to other nodes.

Entering a node (``Lab.cmd``) is a pure argv::

    /bin/sh -c 'echo $$ >.../cidlab/nodeI/cgroup.procs (each hierarchy) && exec "$@"' \\
        nsenter --net=/run/netns/cidlab-nodeI --uts=.. --mount=.. --cgroup=.. -- \\
        [setpriv --reuid=U --regid=G --init-groups --] env -i [--chdir=D] HOME=.. PATH=.. CMD..

``ip netns exec`` is never used: it remounts /sys, and /sys/fs/cgroup is empty inside it.
All nodes share the machine's pid namespace and its /etc/passwd.

cgroups
-------
Everything lives under ``cidlab/`` of the v1 hierarchies ``freezer``, ``pids``, ``cpuacct``
and of the cgroup2 mount ``/sys/fs/cgroup/unified``: ``cidlab/head`` (munged) and
``cidlab/nodeI`` (everything run in node I, and the agent's own job cgroups below it). The
``memory`` hierarchy is never touched (it belongs to the machine's infrastructure).
``down`` kills what is left in ``cidlab`` (v2 ``cgroup.kill``, then SIGKILL to every pid
still listed in a lab cgroup — only lab processes can be there) and removes the tree
depth-first.

State dir (default ``/run/callerid-lab``, ``--dir`` or ``$CALLERID_LAB_DIR``)
--------------------------------------------------------------------------------
``lab.json`` (node count, venv, what ``up`` created), ``ns/``, ``nodes/<node>/{etc,run,state}``
(``etc/agent.toml`` is written here), ``munge/`` (key, seed, ``run/`` = socket dir),
``hosts``, ``run/`` (sd_notify sockets), ``pids/`` (``munged.pid``, ``agent-<node>.pid``),
``logs/`` (``munged.log``, ``agent-<node>.log``). ``down`` removes everything but ``logs/``
(kept for post-mortems; ``down --purge`` removes it too).

One lab per machine: the namespace names, addresses and the ``cidlab`` cgroups are global.
``/run/callerid-lab.owner`` (JSON) names the state dir of the lab that holds the machine and
what its ``up`` created outside that dir (mount-point dirs such as /etc/callerid-adopt and
/run/munge, /run/netns); ``up`` refuses to start while another live lab holds the machine,
rebuilds a lab already up in the same dir, and takes over stale leftovers; ``down`` removes
those dirs again if they are empty.

Processes
---------
munged (user munge, ``--origin 10.77.0.1``) runs in the head network namespace, its socket
is shared with every node through the ``/run/munge`` bind. Agents
(``<venv>/bin/node-agent --config /etc/callerid-adopt/agent.toml``) run inside their node
with a clean environment plus ``NOTIFY_SOCKET``; ``up`` waits for their sd_notify
``READY=1``. Every lab daemon has a pid file and is stopped by pid (checked to still sit in
a ``cidlab`` cgroup), never by name.

Users ``alice`` and ``bob`` are created if missing (GECOS "callerid-adopt lab user") and
kept at ``down``: removing accounts that may own files elsewhere is not the lab's call.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("lab")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = Path("/run/callerid-lab")
OWNER_FILE = Path("/run/callerid-lab.owner")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SUBTREE = "cidlab"
NETNS_PREFIX = "cidlab-"
HEAD = "head"
BRIDGE = "cidbr0"
#: The hierarchies the lab uses, by their directory under /sys/fs/cgroup. Never "memory".
HIERARCHIES = ("freezer", "pids", "cpuacct", "unified")
#: The v1 list written into agent.toml (same order as the spec's example).
AGENT_V1 = ("freezer", "cpuacct", "pids")
AGENT_PORT = 7011
METRICS_PORT = 9817
LAB_USERS = ("alice", "bob")
LAB_USER_GECOS = "callerid-adopt lab user"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_NODES = 200
AGENT_READY_TIMEOUT = 30.0
MUNGE_TIMEOUT = 10.0
NET_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0


def _tool(name: str) -> str:
    return shutil.which(name, path=PATH) or name


SH = "/bin/sh"
NSENTER = _tool("nsenter")
UNSHARE = _tool("unshare")
SETPRIV = _tool("setpriv")
ENV = _tool("env")
IP = _tool("ip")
MOUNT = _tool("mount")
UMOUNT = _tool("umount")
MUNGED = _tool("munged")
MUNGEKEY = _tool("mungekey")
USERADD = _tool("useradd")


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says what and where to look."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run in a node failed; ``str()`` shows the command, rc, stdout and stderr."""

    def __init__(
        self, node: str, returncode: int, cmd: Sequence[str], output: str, stderr: str
    ) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.node = node

    def __str__(self) -> str:
        return (
            f"command in {self.node} failed with rc={self.returncode}: "
            f"{shlex.join(self.cmd)}\n--- stdout ---\n{self.output or ''}"
            f"--- stderr ---\n{self.stderr or ''}"
        )


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy the lab uses, as mounted on the host."""

    name: str  # directory under /sys/fs/cgroup ("freezer", "unified")
    mountpoint: Path
    fstype: str  # "cgroup" or "cgroup2"
    options: str  # v1 super options to mount it again ("freezer", "cpu,cpuacct"); "" for v2

    @property
    def lab_root(self) -> Path:
        return self.mountpoint / SUBTREE

    def group(self, name: str) -> Path:
        return self.lab_root / name


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount point, fstype, source, super options) of this process's mounts, in order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source, sopts = (right.split() + ["", "", ""])[:3]
        out.append((_unescape(fields[4]), fstype, source, sopts))
    return out


def _is_mount(path: str | Path) -> bool:
    """True if something is mounted at path (os.path.ismount misses same-fs bind mounts)."""
    p = os.path.realpath(path)
    return any(m[0] == p for m in _mountinfo())


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return path.encode().decode("unicode_escape") if "\\" in path else path


def discover_hierarchies(root: Path = CGROUP_ROOT) -> list[Hierarchy]:
    """The lab hierarchies present on this machine (v1 ones may be co-mounted or absent)."""
    mounts = {m[0]: m for m in _mountinfo()}
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


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _run_host(
    argv: Sequence[str], input: str | None = None, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a lab tool (ip, mount, ...) on the host; never anything that touches the network."""
    r = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout,
        env={"PATH": PATH, "LC_ALL": "C"},
    )
    if check and r.returncode != 0:
        raise LabError(
            f"{shlex.join(argv)} failed (rc={r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
            + (f"\ninput:\n{input}" if input else "")
        )
    return r


def _pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return st[st.rindex(")") + 2] not in "ZX"


def _pid_in_lab(pid: int) -> bool:
    """True if pid sits in a ``cidlab`` cgroup: guards kills against pid reuse."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in text.splitlines():
        path = line.split(":", 2)[2]
        if path == f"/{SUBTREE}" or path.startswith(f"/{SUBTREE}/"):
            return True
    return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _read_owner() -> dict[str, Any] | None:
    """The owner file: {"dir": state dir of the lab that holds the machine, created_...}."""
    try:
        text = OWNER_FILE.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"dir": text.strip()}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class Lab:
    """A multi-node lab in state dir ``dir``. See the module docstring for the layout."""

    def __init__(
        self,
        dir: str | Path | None = None,
        nodes: int = 2,
        venv: str | Path | None = None,
        agents: bool = True,
    ) -> None:
        if dir is None:
            dir = os.environ.get("CALLERID_LAB_DIR") or DEFAULT_DIR
        self.dir = Path(os.path.realpath(dir))
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES}, not {nodes}")
        self.nodes: list[str] = [f"node{i}" for i in range(1, nodes + 1)]
        self.venv = Path(os.path.abspath(venv)) if venv is not None else REPO / ".venv"
        self.agents = agents  # what `with Lab(...)` passes to up()
        self._hier: list[Hierarchy] | None = None
        self._children: dict[int, subprocess.Popen[Any]] = {}  # daemons we started, to reap

    # ----------------------------------------------------------------- basics

    @classmethod
    def load(cls, dir: str | Path | None = None) -> Lab:
        """The lab described by ``<dir>/lab.json`` (written by ``up``); defaults if absent."""
        lab = cls(dir)
        state = lab._load_state()
        if state:
            lab = cls(lab.dir, int(state.get("nodes", 2)), state.get("venv"))
        return lab

    def __enter__(self) -> Lab:
        self.up(agents=self.agents)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab({str(self.dir)!r}, nodes={len(self.nodes)})"

    @property
    def hierarchies(self) -> list[Hierarchy]:
        if self._hier is None:
            self._hier = discover_hierarchies()
        return self._hier

    def index(self, node: str) -> int:
        if node not in self.nodes:
            raise LabError(f"unknown node {node!r}; this lab has {', '.join(self.nodes)}")
        return int(node[4:])

    def ip(self, node: str, family: int = 4) -> str:
        """``10.77.0.(10+i)`` or ``fd77::(10+i)`` for node i; ``head`` is .1 / ::1."""
        suffix = "1" if node == HEAD else str(10 + self.index(node))
        if family in (4, socket.AF_INET):
            return f"10.77.0.{suffix}"
        if family in (6, socket.AF_INET6):
            return f"fd77::{suffix}"
        raise ValueError(f"family must be 4 or 6, not {family}")

    def netns(self, node: str) -> str:
        return NETNS_PREFIX + node

    def netns_path(self, node: str) -> Path:
        return NETNS_DIR / self.netns(node)

    def ns_file(self, node: str, kind: str) -> Path:
        return self.dir / "ns" / node / kind

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def venv_bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def munge_socket(self) -> Path:
        """The munged socket as seen on the host; nodes see it as /run/munge/munge.socket.2."""
        return self.dir / "munge" / "run" / "munge.socket.2"

    def is_up(self) -> bool:
        return self._load_state().get("state") == "up"

    # ------------------------------------------------------------- commands

    def _enter(self, group: str, nsenter_args: Sequence[str], argv: Sequence[str]) -> list[str]:
        procs = [h.group(group) / "cgroup.procs" for h in self.hierarchies]
        moves = " && ".join(f"echo $$ >{shlex.quote(str(p))}" for p in procs) or ":"
        return [SH, "-c", f'{moves} && exec "$@"', f"lab-{group}", NSENTER, *nsenter_args,
                "--", *argv]

    def cmd(
        self,
        node: str,
        argv: Sequence[str],
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> list[str]:
        """The full argv that runs ``argv`` inside ``node`` (pure: nothing is executed).

        The process moves itself into ``cidlab/<node>`` of each lab hierarchy, enters the
        node's network, UTS, mount and cgroup namespaces, drops to ``user`` (name or uid;
        default root) with its groups, and runs with a clean environment: HOME, USER,
        LOGNAME, SHELL, PATH plus ``env``; ``cwd`` is resolved inside the node.
        """
        self.index(node)
        if not argv:
            raise ValueError("empty command")
        if user is None:
            pw = pwd.getpwuid(0)
        elif isinstance(user, int) or user.isdigit():
            pw = pwd.getpwuid(int(user))
        else:
            pw = pwd.getpwnam(user)
        inner: list[str] = []
        if pw.pw_uid != 0:
            inner += [SETPRIV, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                      "--"]
        inner += [ENV, "-i"]
        if cwd is not None:
            inner.append(f"--chdir={cwd}")
        variables = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell or "/bin/sh", "PATH": PATH,
        }
        for k, v in (env or {}).items():
            if not k or "=" in k or "\0" in k + v:
                raise ValueError(f"bad environment variable name or value: {k!r}")
            variables[k] = v
        inner += [f"{k}={v}" for k, v in variables.items()]
        if "=" in argv[0]:
            raise ValueError(f"command name must not contain '=': {argv[0]!r}")
        inner += [str(a) for a in argv]
        return self._enter(node, [
            f"--net={self.netns_path(node)}",
            f"--uts={self.ns_file(node, 'uts')}",
            f"--mount={self.ns_file(node, 'mnt')}",
            f"--cgroup={self.ns_file(node, 'cgroup')}",
        ], inner)

    def run(
        self,
        node: str,
        argv: Sequence[str],
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        input: str | None = None,
        timeout: float | None = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``node``, capture stdout/stderr as text; LabCommandError if check."""
        full = self.cmd(node, argv, user=user, env=env, cwd=cwd)
        r = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise LabCommandError(node, r.returncode, argv, r.stdout, r.stderr)
        return r

    def popen(
        self,
        node: str,
        argv: Sequence[str],
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; ``popen_kwargs`` go to subprocess.Popen.

        The returned pid is the command's own pid (the wrapper chain only execs). ``down``
        kills whatever is still running in the lab.
        """
        return subprocess.Popen(self.cmd(node, argv, user=user, env=env, cwd=cwd),
                                **popen_kwargs)

    # ----------------------------------------------------------------- state

    def _state_path(self) -> Path:
        return self.dir / "lab.json"

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_path().read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, state: Mapping[str, Any]) -> None:
        _write(self._state_path(), json.dumps(state, indent=2, sort_keys=True) + "\n")
        # What up created outside the dir is also kept in the owner file, so a teardown
        # still finds it when the dir was damaged or removed.
        owner = _read_owner()
        if owner is not None and owner.get("dir") == str(self.dir):
            owner.update({k: state[k] for k in ("created_dirs", "created_netns_dir")
                          if k in state})
            _write(OWNER_FILE, json.dumps(owner, sort_keys=True) + "\n")

    @staticmethod
    def _require_root() -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, cgroups, mounts)")

    def _claim_machine(self) -> None:
        """Take ``/run/callerid-lab.owner`` for this dir, or explain who holds the machine."""
        for _ in range(3):
            try:
                fd = os.open(OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = Path((_read_owner() or {}).get("dir") or "/nonexistent")
                if other == self.dir:
                    log.info("lab at %s is already up or half up: tearing it down first",
                             self.dir)
                    self.down()
                    continue
                if (other / "lab.json").exists():
                    raise LabError(
                        f"another lab is up at {other}; run `lab.py --dir {other} down` first"
                    ) from None
                log.warning("taking over leftovers of a stale lab at %s", other)
                Lab(other).down()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"dir": str(self.dir)}) + "\n")
            return
        raise LabError(f"could not take {OWNER_FILE}")

    # -------------------------------------------------------------------- up

    def up(self, agents: bool = True) -> None:
        """Build the lab (idempotent: a lab already up in this dir is rebuilt).

        On any failure everything already built is torn down before the error propagates.
        """
        self._require_root()
        missing = [t for t in (NSENTER, UNSHARE, SETPRIV, ENV, IP, MOUNT, UMOUNT, MUNGED,
                               MUNGEKEY, USERADD) if not os.path.isabs(t)]
        if missing:
            raise LabError(f"missing tools {missing}: run deploy/install-deps.sh")
        t0 = time.monotonic()
        self._claim_machine()
        # Leftovers nobody owns (a crash before the owner file existed) are ours to clear.
        if self._leftovers():
            log.warning("clearing leftovers of an earlier lab")
            self._teardown_global()
        state: dict[str, Any] = {
            "state": "starting", "nodes": len(self.nodes), "venv": str(self.venv),
            "agents": agents, "created_dirs": [], "created_netns_dir": False,
        }
        try:
            self._make_dirs()
            self._save_state(state)
            self._make_cgroups()
            self._make_network(state)
            self._save_state(state)
            self._make_nodes(state)
            self._save_state(state)
            self._ensure_users()
            self._start_munged()
            if agents:
                self.agents_start(self.nodes)
            state["state"] = "up"
            self._save_state(state)
        except BaseException:
            log.error("lab up failed: tearing down")
            try:
                self.down()
            except Exception:  # keep the original error visible
                log.exception("down after a failed up also failed")
            raise
        log.info("lab up at %s: %s (%.2f s)", self.dir, ", ".join(self.nodes),
                 time.monotonic() - t0)

    def _make_dirs(self) -> None:
        d = self.dir
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged checks every parent of its files
        for sub in ("ns", "nodes", "run", "pids", "logs"):
            (d / sub).mkdir(mode=0o755, exist_ok=True)
        for old in (d / "logs").iterdir():  # a fresh run gets fresh logs
            if old.is_file():
                old.unlink()
        # ns/ must be a private mount to hold mount-namespace files (else EINVAL).
        if not _is_mount(d / "ns"):
            _run_host([MOUNT, "--bind", str(d / "ns"), str(d / "ns")])
        _run_host([MOUNT, "--make-private", str(d / "ns")])
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.ip(HEAD)} {HEAD}", f"{self.ip(HEAD, 6)} {HEAD}"]
        for node in self.nodes:
            lines += [f"{self.ip(node)} {node}", f"{self.ip(node, 6)} {node}"]
        _write(d / "hosts", "# callerid-adopt lab\n" + "\n".join(lines) + "\n")
        for node in self.nodes:
            nd = self.node_dir(node)
            for sub, mode in (("etc", 0o755), ("run", 0o755), ("state", 0o700)):
                (nd / sub).mkdir(mode=mode, parents=True, exist_ok=True)
            (d / "ns" / node).mkdir(exist_ok=True)
            for kind in ("uts", "mnt", "cgroup"):
                self.ns_file(node, kind).touch()
            _write(nd / "etc" / "agent.toml", self.agent_config(node))

    def agent_config(self, node: str) -> str:
        """The agent.toml the lab writes for ``node`` (seen there as /etc/callerid-adopt)."""
        v4, v6 = self.ip(node), self.ip(node, 6)
        have = {h.name for h in self.hierarchies}
        v1 = [h for h in AGENT_V1 if h in have]
        return "\n".join([
            "# written by deploy/lab/lab.py",
            f'node_name = "{node}"',
            f'listen = ["{v4}:{AGENT_PORT}", "[{v6}]:{AGENT_PORT}"]',
            'socket = "/run/callerid-adopt/agent.sock"',
            f"port = {AGENT_PORT}",
            'state_dir = "/var/lib/callerid-adopt"',
            "admin_uids = []",
            'log_level = "debug"',
            f'metrics_listen = "{v4}:{METRICS_PORT}"',
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
        ])

    def _make_cgroups(self) -> None:
        if not self.hierarchies:
            raise LabError(f"none of the cgroup hierarchies {HIERARCHIES} is mounted")
        for h in self.hierarchies:
            for group in [HEAD, *self.nodes]:
                h.group(group).mkdir(parents=True, exist_ok=True)

    def _make_network(self, state: dict[str, Any]) -> None:
        if not NETNS_DIR.exists():
            state["created_netns_dir"] = True
            self._save_state(state)  # before creating it: a failure below must undo it
        for node in [HEAD, *self.nodes]:
            _run_host([IP, "netns", "add", self.netns(node)])
        head = [
            "link set lo up",
            # STP off: ports forward at once; snooping off: NDP multicast is always flooded.
            f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
            f"addr add {self.ip(HEAD)}/24 dev {BRIDGE}",
            f"addr add {self.ip(HEAD, 6)}/64 dev {BRIDGE} nodad",
            f"link set {BRIDGE} up",
        ]
        for node in self.nodes:
            head += [
                f"link add veth-{node} type veth peer name eth0 netns {self.netns(node)}",
                f"link set veth-{node} master {BRIDGE}",
                f"link set veth-{node} up",
            ]
        _run_host([IP, "-n", self.netns(HEAD), "-batch", "-"], input="\n".join(head) + "\n")
        for node in self.nodes:
            _run_host([IP, "-n", self.netns(node), "-batch", "-"], input="\n".join([
                "link set lo up",
                f"addr add {self.ip(node)}/24 dev eth0",
                f"addr add {self.ip(node, 6)}/64 dev eth0 nodad",
                "link set eth0 up",
            ]) + "\n")
        self._wait_network()

    def _wait_network(self) -> None:
        """Wait until every node's eth0 is up, no address is tentative, bridge ports forward."""
        deadline = time.monotonic() + NET_TIMEOUT
        pending = list(self.nodes)
        while True:
            still = []
            for node in pending:
                link = json.loads(_run_host(
                    [IP, "-j", "-n", self.netns(node), "link", "show", "dev", "eth0"]).stdout)
                tent = json.loads(_run_host(
                    [IP, "-j", "-n", self.netns(node), "addr", "show", "dev", "eth0",
                     "tentative"]).stdout)
                tentative = [a for i in tent for a in i.get("addr_info", [])
                             if a.get("family") == "inet6" and a.get("scope") == "global"]
                if link[0].get("operstate") != "UP" or tentative:
                    still.append(node)
            ports = json.loads(_run_host(
                [IP, "-j", "-n", self.netns(HEAD), "link", "show", "master", BRIDGE]).stdout)
            if not still and all(p.get("operstate") == "UP" for p in ports):
                return
            if time.monotonic() > deadline:
                raise LabError(f"network not ready after {NET_TIMEOUT} s: {still or ports}")
            pending = still or pending
            time.sleep(0.02)

    def _mount_points(self, node: str) -> list[tuple[Path, Path]]:
        """(source on the host, target inside the node) of the node's bind mounts."""
        nd = self.node_dir(node)
        return [
            (self.dir / "hosts", Path("/etc/hosts")),
            (nd / "etc", Path("/etc/callerid-adopt")),
            (nd / "run", Path("/run/callerid-adopt")),
            (nd / "state", Path("/var/lib/callerid-adopt")),
            (self.dir / "munge" / "run", Path("/run/munge")),
        ]

    def _make_nodes(self, state: dict[str, Any]) -> None:
        (self.dir / "munge" / "run").mkdir(parents=True, exist_ok=True)
        created: list[str] = state["created_dirs"]
        for _, target in self._mount_points(self.nodes[0]):
            if not target.exists():
                created.append(str(target))
                self._save_state(state)
                target.mkdir(mode=0o755, parents=True)
        for node in self.nodes:
            script = ["set -e", f"echo {node} >/proc/sys/kernel/hostname"]
            for h in self.hierarchies:
                mp = shlex.quote(str(h.mountpoint))
                script.append(f"{UMOUNT} {mp}")
                if h.fstype == "cgroup":
                    script.append(f"{MOUNT} -t cgroup -o {shlex.quote(h.options)} cgroup {mp}")
                else:
                    script.append(f"{MOUNT} -t cgroup2 cgroup2 {mp}")
            for src, target in self._mount_points(node):
                script.append(f"{MOUNT} --bind {shlex.quote(str(src))} {shlex.quote(str(target))}")
            # No references to other nodes' namespaces from inside this one.
            script.append(f"{UMOUNT} -l {shlex.quote(str(self.dir / 'ns'))}")
            script.append(f"if mountpoint -q {NETNS_DIR}; then {UMOUNT} -l {NETNS_DIR}; fi")
            argv = [
                SH, "-c",
                " && ".join(f"echo $$ >{shlex.quote(str(h.group(node) / 'cgroup.procs'))}"
                            for h in self.hierarchies) + ' && exec "$@"',
                f"lab-{node}", UNSHARE,
                f"--uts={self.ns_file(node, 'uts')}",
                f"--mount={self.ns_file(node, 'mnt')}",
                f"--cgroup={self.ns_file(node, 'cgroup')}",
                "--propagation", "private", "--", SH, "-c", "\n".join(script),
            ]
            _run_host(argv)

    def _ensure_users(self) -> None:
        for user in LAB_USERS:
            try:
                pwd.getpwnam(user)
            except KeyError:
                log.info("creating user %s", user)
                _run_host([USERADD, "-m", "-s", "/bin/bash", "-c", LAB_USER_GECOS, user])

    # ----------------------------------------------------------------- munge

    def _start_munged(self) -> None:
        md = self.dir / "munge"
        run = md / "run"
        mu = pwd.getpwnam("munge")
        key = md / "munge.key"
        if not key.exists():
            _run_host([MUNGEKEY, "--create", f"--keyfile={key}"])
        logf = self.dir / "logs" / "munged.log"
        logf.touch()
        for path in (md, run, key, logf):
            os.chown(path, mu.pw_uid, mu.pw_gid)
        os.chmod(md, 0o711)  # munged: the socket path must be searchable by all
        os.chmod(run, 0o755)
        os.chmod(key, 0o600)
        os.chmod(logf, 0o640)
        sock = run / "munge.socket.2"
        argv = self._enter(HEAD, [f"--net={self.netns_path(HEAD)}"], [
            SETPRIV, f"--reuid={mu.pw_uid}", f"--regid={mu.pw_gid}", "--init-groups", "--",
            ENV, "-i", f"PATH={PATH}", MUNGED, "--foreground",
            f"--key-file={key}", f"--socket={sock}", f"--pid-file={run / 'munged.pid'}",
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
                    f"munged did not come up (rc={p.poll()}); log:\n{_tail(logf)}\n"
                    f"stderr:\n{_tail(self.dir / 'logs' / 'munged.out')}"
                )
            time.sleep(0.01)

    def _spawn(self, argv: Sequence[str], logfile: Path, pidfile: Path,
               env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:
            p = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(env) if env else {"PATH": PATH},
            )
        self._children[p.pid] = p
        _write(pidfile, f"{p.pid}\n")
        return p

    # ---------------------------------------------------------------- agents

    def _agent_pidfile(self, node: str) -> Path:
        return self.dir / "pids" / f"agent-{node}.pid"

    def _agent_logfile(self, node: str) -> Path:
        return self.dir / "logs" / f"agent-{node}.log"

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
        if self._load_state().get("state") not in ("starting", "up"):
            raise LabError(f"no lab is up at {self.dir}")
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
                notify = self._notify_path(node)
                with contextlib.suppress(FileNotFoundError):
                    notify.unlink()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                socks[node] = sock
                sock.bind(str(notify))
                sock.setblocking(False)
                logf = self._agent_logfile(node)
                with open(logf, "ab") as f:
                    f.write(f"--- lab: starting agent {time.strftime('%F %T')}\n".encode())
                argv = self.cmd(node, [exe, "--config", "/etc/callerid-adopt/agent.toml"],
                                env={"NOTIFY_SOCKET": str(notify)})
                procs[node] = self._spawn(argv, logf, self._agent_pidfile(node))
            deadline = time.monotonic() + AGENT_READY_TIMEOUT
            waiting = set(nodes)
            while waiting:
                for node in sorted(waiting):
                    if self._got_ready(socks[node]):
                        log.info("agent %s ready (pid %d)", node, procs[node].pid)
                        waiting.discard(node)
                        continue
                    p = procs[node]
                    if p.poll() is not None:
                        why = f"exited with rc={p.returncode}"
                    elif time.monotonic() > deadline:
                        why = f"sent no READY=1 within {AGENT_READY_TIMEOUT:.0f} s"
                        self.agent_stop(node, signal.SIGKILL)
                    else:
                        continue
                    logf = self._agent_logfile(node)
                    raise LabError(f"agent on {node} {why}; tail of {logf}:\n{_tail(logf)}")
                if waiting:
                    time.sleep(0.01)
        finally:
            for node, sock in socks.items():
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    self._notify_path(node).unlink()

    @staticmethod
    def _got_ready(sock: socket.socket) -> bool:
        while True:
            try:
                msg = sock.recv(4096).decode(errors="replace")
            except BlockingIOError:
                return False
            if "READY=1" in msg.splitlines():
                return True

    def _notify_path(self, node: str) -> Path:
        return self.dir / "run" / f"notify-{node}.sock"

    def agent_pid(self, node: str) -> int | None:
        """The agent's pid if it runs (pid file + alive + still in a lab cgroup)."""
        pid = _read_pid(self._agent_pidfile(node))
        if pid is None or not _pid_alive(pid) or not _pid_in_lab(pid):
            return None
        return pid

    def agent_stop(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        """Signal the agent by its pid file; with ``wait``, wait (10 s, then SIGKILL)."""
        self._stop_pidfile(self._agent_pidfile(node), sig, wait)

    def agent_log(self, node: str) -> str:
        try:
            return self._agent_logfile(node).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _stop_pidfile(self, pidfile: Path, sig: int, wait: bool,
                      timeout: float = STOP_TIMEOUT) -> None:
        pid = _read_pid(pidfile)
        if pid is None:
            return
        if _pid_alive(pid) and _pid_in_lab(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if wait and not self._wait_dead(pid, timeout) and sig != signal.SIGKILL:
                log.warning("pid %d (%s) ignored signal %d for %.0f s: SIGKILL", pid,
                            pidfile.name, sig, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_dead(pid, 5)
        elif _pid_alive(pid):
            log.warning("%s names pid %d, which is not in a lab cgroup: left alone",
                        pidfile, pid)
        if not wait and _pid_alive(pid):
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
        while _pid_alive(pid):
            p = self._children.get(pid)
            if p is not None:
                p.poll()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------ down

    def down(self, purge: bool = False) -> None:
        """Tear everything down, also after a partial ``up``; idempotent.

        Keeps ``<dir>/logs`` unless ``purge``. If another live lab owns the machine, only
        this dir's files are cleaned and the global resources are left to their owner.
        """
        self._require_root()
        t0 = time.monotonic()
        state = self._load_state()
        mine = self._owns_machine()
        owner = _read_owner() or {}
        if mine:  # merge what the owner file remembers of things created outside the dir
            state["created_dirs"] = sorted(
                set(state.get("created_dirs", [])) | set(owner.get("created_dirs", [])))
            state["created_netns_dir"] = bool(state.get("created_netns_dir")
                                              or owner.get("created_netns_dir"))
        errors: list[str] = []

        def step(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: tear down as much as possible
                log.error("down: %s: %s", what, e)
                errors.append(f"{what}: {e}")

        if mine:
            pids = self.dir / "pids"
            if pids.is_dir():
                for pf in sorted(pids.glob("agent-*.pid")):
                    step(f"stop {pf.name}", self._stop_pidfile, pf, signal.SIGTERM, True, 5.0)
                step("stop munged", self._stop_pidfile, pids / "munged.pid", signal.SIGTERM,
                     True, 5.0)
            step("kill leftover lab processes", self._kill_cgroups)
        step("unmount", self._unmount_dir)
        if mine:
            step("global teardown", self._teardown_global, state)
            with contextlib.suppress(FileNotFoundError):
                OWNER_FILE.unlink()
        step("remove state dir", self._remove_dir, purge)
        for pid in list(self._children):
            self._reap(pid)
        if errors:
            raise LabError("down left things behind:\n  " + "\n  ".join(errors))
        log.info("lab down at %s (%.2f s)", self.dir, time.monotonic() - t0)

    def _owns_machine(self) -> bool:
        owner = _read_owner()
        if owner is None:
            return True  # nobody claims it: leftovers, if any, are stale
        other = Path(owner.get("dir") or "/nonexistent")
        if other == self.dir or not (other / "lab.json").exists():
            return True
        log.warning("the machine's lab belongs to %s: only cleaning %s", other, self.dir)
        return False

    def _leftovers(self) -> bool:
        if any(h.lab_root.exists() for h in self.hierarchies):
            return True
        return any(n.startswith(NETNS_PREFIX) for n in self._netns_names())

    @staticmethod
    def _netns_names() -> list[str]:
        try:
            return sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []

    def _lab_cgroups(self) -> list[Path]:
        """Every cgroup dir under cidlab/ in each lab hierarchy, deepest first."""
        out: list[Path] = []
        for h in self.hierarchies:
            if h.lab_root.is_dir():
                for root, dirs, _ in os.walk(h.lab_root):
                    out += [Path(root) / d for d in dirs]
                out.append(h.lab_root)
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
            kill = h.lab_root / "cgroup.kill"
            if h.fstype == "cgroup2" and kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
        deadline = time.monotonic() + 5
        while True:
            left = {p for p in self._lab_pids() if _pid_alive(p)}
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
        """Thaw every frozen v1 freezer cgroup under cidlab (e.g. a job the agent froze)."""
        for cg in self._lab_cgroups():
            self_freezing = cg / "freezer.self_freezing"
            with contextlib.suppress(FileNotFoundError, OSError):
                if self_freezing.read_text().strip() == "1":
                    (cg / "freezer.state").write_text("THAWED")

    def _unmount_dir(self) -> None:
        """Unmount everything mounted at or below the state dir, deepest first."""
        prefix = str(self.dir) + "/"
        targets = [m[0] for m in _mountinfo() if m[0] == str(self.dir) or m[0].startswith(prefix)]
        for t in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
            while _is_mount(t):  # a path can carry several stacked mounts
                r = _run_host([UMOUNT, t], check=False)
                if r.returncode != 0:
                    r = _run_host([UMOUNT, "-l", t], check=False)
                    if r.returncode != 0:
                        raise LabError(f"umount {t}: {r.stderr.strip()}")

    def _teardown_global(self, state: Mapping[str, Any] | None = None) -> None:
        state = state or {}
        self._kill_cgroups()
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
        for name in self._netns_names():
            if name.startswith(NETNS_PREFIX):
                r = _run_host([IP, "netns", "delete", name], check=False)
                if r.returncode != 0:
                    errors.append(f"ip netns delete {name}: {r.stderr.strip()}")
        if state.get("created_netns_dir") and NETNS_DIR.is_dir() and not self._netns_names():
            while _is_mount(NETNS_DIR):
                if _run_host([UMOUNT, str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        for d in reversed(state.get("created_dirs", [])):
            with contextlib.suppress(FileNotFoundError):
                try:
                    Path(d).rmdir()
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        raise
                    log.warning("%s (created by the lab) is not empty: left in place", d)
        if errors:
            raise LabError("; ".join(errors))

    def _remove_dir(self, purge: bool) -> None:
        if not self.dir.is_dir():
            return
        if any(m[0].startswith(str(self.dir) + "/") for m in _mountinfo()):
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

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """What is up: nodes, addresses, daemons and whether they are alive."""
        state = self._load_state()
        munged = _read_pid(self.dir / "pids" / "munged.pid")
        return {
            "dir": str(self.dir),
            "state": state.get("state", "down"),
            "owner": (_read_owner() or {}).get("dir"),
            "munged": {"pid": munged, "alive": munged is not None and _pid_alive(munged)},
            "nodes": {
                node: {
                    "ipv4": self.ip(node), "ipv6": self.ip(node, 6),
                    "netns": self.netns_path(node).exists(),
                    "agent_pid": self.agent_pid(node),
                }
                for node in self.nodes
            },
        }


# -------------------------------------------------------------------- CLI


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command of `exec`, options included.
    tail: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0] if __doc__
                                else None)
    p.add_argument("--dir", default=None,
                   help=f"state dir (default $CALLERID_LAB_DIR or {DEFAULT_DIR})")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab (rebuilds one already up in --dir)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--venv", default=None, help="venv holding node-agent (default <repo>/.venv)")
    up.add_argument("--no-agents", action="store_true")
    down = sub.add_parser("down", help="tear everything down (idempotent)")
    down.add_argument("--purge", action="store_true", help="remove the logs and the dir too")
    sub.add_parser("status", help="nodes, addresses, daemons alive?")
    ex = sub.add_parser("exec", help="run a command inside a node; exit status is its own")
    ex.add_argument("node")
    ex.add_argument("--user", default=None)
    ex.add_argument("--env", action="append", default=[], metavar="K=V")
    ex.add_argument("--cwd", default=None)
    ex.add_argument("argv", nargs="*", metavar="CMD", help="after --: the command and its args")
    ag = sub.add_parser("agent", help="start|stop|kill|restart a node's agent")
    ag.add_argument("node")
    ag.add_argument("action", choices=["start", "stop", "kill", "restart"])
    args = p.parse_args(argv)
    if tail is not None:
        if args.command != "exec":
            p.error("'--' only separates the command of exec")
        args.argv = list(args.argv) + tail
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="lab: %(message)s", stream=sys.stderr)
    try:
        if args.command == "up":
            Lab(args.dir, args.nodes, args.venv).up(agents=not args.no_agents)
            return 0
        lab = Lab.load(args.dir)
        if args.command == "down":
            lab.down(purge=args.purge)
        elif args.command == "status":
            print(json.dumps(lab.status(), indent=2))
        elif args.command == "exec":
            cmd = args.argv
            if not cmd:
                raise LabError("exec: no command given (lab.py exec NODE -- CMD...)")
            env = {}
            for kv in args.env:
                k, sep, v = kv.partition("=")
                if not sep:
                    raise LabError(f"--env wants K=V, not {kv!r}")
                env[k] = v
            Lab._require_root()
            full = lab.cmd(args.node, cmd, user=args.user, env=env, cwd=args.cwd)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(full[0], full)
        elif args.command == "agent":
            if args.action in ("stop", "restart"):
                lab.agent_stop(args.node)
            elif args.action == "kill":
                lab.agent_stop(args.node, signal.SIGKILL)
            if args.action in ("start", "restart"):
                lab.agent_start(args.node)
        return 0
    except (LabError, ValueError, KeyError) as e:
        print(f"lab.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
