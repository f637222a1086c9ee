#!/usr/bin/python3
"""The callerid-adopt multi-node lab: N "nodes" on one Linux machine, built from namespaces.

The demo, the integration tests and the benchmarks run on this lab. It is stdlib-only
(Debian's /usr/bin/python3 or the project venv), root-only, importable
(``sys.path.insert(0, "<repo>/deploy/lab"); import lab``) and a CLI (``lab.py --help``).

Instances
---------
Several labs can be up at once on one machine, each under its own *name* (default
``cidlab``) and state dir (default ``/run/callerid-lab``; ``/run/<name>`` for other names).
The name prefixes everything that must be unique on the machine: the network namespaces
(``<name>-head``, ``<name>-node1``, ...), the cgroup subtree ``<hierarchy>/<name>/``, the
owner file (``/run/callerid-lab.owner`` for ``cidlab``, ``/run/callerid-lab.<name>.owner``
otherwise) and the nftables table. Addresses are the same in every instance (10.77.0.x,
fd77::x): each instance has its own head namespace and bridge, so they never meet.
Per-node bind mounts live in the node's own mount namespace and do not clash either.
``up`` refuses only while a lab of the SAME name is up in another dir (or another lab is
up in the same dir).

A few things are machine-wide and shared by every instance that is up: the mount-point
directories ``up`` has to create on the host (``/etc/callerid-adopt``, ``/run/munge``, ...,
``/run/sshd``), ``/run/netns``, the users alice and bob, and ``/dev/log`` (below). They are
created under ``/run/callerid-lab.lock`` (flock), recorded in ``/run/callerid-lab.shared.json``
and removed by the ``down`` of the last instance (no other owner file whose dir still has a
``lab.json``): removing a directory that is a mount point in another instance's node would
silently detach that node's mount.

Layout
------
Network (``ip``)::

    netns <name>-head    bridge cidbr0  10.77.0.1/24  fd77::1/64      (munged runs here)
      |- veth-node1 <==> netns <name>-node1  eth0  10.77.0.11/24  fd77::11/64
      |- veth-node2 <==> netns <name>-node2  eth0  10.77.0.12/24  fd77::12/64
      ...

  The veth peers are created directly inside the namespaces, IPv6 addresses carry
  ``nodad`` (usable at once), the bridge has STP and multicast snooping off (ports forward
  at once). No lab namespace has a default route: nothing can leave the machine.

A node ``nodeI`` = its network namespace + UTS (hostname ``nodeI``) + mount + cgroup
namespace. The last three are persisted as nsfs bind mounts in ``<dir>/ns/nodeI/`` (a
private bind mount, which the kernel requires to hold a mount-namespace file) and are made by
``unshare`` run from a shell that first moved itself into ``<name>/nodeI`` of every lab
hierarchy, so the node's cgroup namespace is rooted at its own subtree. Inside the node's
mount namespace the lab

* unmounts and mounts again each lab cgroup hierarchy (mounting over one gives EBUSY),
  so ``/sys/fs/cgroup/<h>`` shows only the node's subtree;
* bind-mounts ``<dir>/hosts`` over ``/etc/hosts`` (lab names never reach DNS),
  ``nodes/nodeI/{etc,run,state}`` over ``/etc/callerid-adopt``, ``/run/callerid-adopt``,
  ``/var/lib/callerid-adopt``, and ``<dir>/munge/run`` over ``/run/munge``; with sshd also
  ``nodes/nodeI/pam.d`` over ``/etc/pam.d`` and ``<dir>/ssh/ssh_config.d`` over
  ``/etc/ssh/ssh_config.d``;
* detaches ``<dir>/ns``, ``/run/netns`` and every other nsfs mount (other instances'
  nodes), so a node holds no references to other nodes.

Entering a node (``Lab.cmd``) is a pure argv::

    /bin/sh -c 'echo $$ >.../<name>/nodeI/cgroup.procs (each hierarchy) && exec "$@"' \\
        nsenter --net=/run/netns/<name>-nodeI --uts=.. --mount=.. --cgroup=.. -- \\
        [setpriv --reuid=U --regid=G --init-groups --] env -i [--chdir=D] HOME=.. PATH=.. CMD..

``ip netns exec`` is never used: it remounts /sys, and /sys/fs/cgroup is empty inside it.
All nodes share the machine's pid namespace and its /etc/passwd.

cgroups
-------
Everything lives under ``<name>/`` of the v1 hierarchies ``freezer``, ``pids``, ``cpuacct``
and of the cgroup2 mount ``/sys/fs/cgroup/unified``: ``<name>/head`` (munged, the syslog
listener) and ``<name>/nodeI`` (everything run in node I: agent, sshd, logins, and the
agent's own job cgroups below it). The ``memory`` hierarchy is never touched (it belongs to
the machine's infrastructure). ``down`` kills what is left in ``<name>`` (v2
``cgroup.kill``, then SIGKILL to every pid still listed in a lab cgroup — only lab processes
can be there) and removes the tree depth-first.

State dir
---------
``lab.json`` (name, node count, venv, what is up), ``ns/``, ``nodes/<node>/{etc,run,state}``
(``etc/agent.toml`` is written here), ``munge/`` (key, seed, ``run/`` = socket dir),
``hosts``, ``run/`` (sd_notify sockets, sshd's own pid files), ``pids/`` (``munged.pid``,
``agent-<node>.pid``, ``sshd-<node>[-none|-noop].pid``, ``syslog.pid``), ``logs/``
(``munged.log``, ``agent-<node>.log``, ``sshd-<node>[-none|-noop].log``, ``syslog.log``),
and with sshd ``bin/``, ``ssh/``, ``nodes/<node>/{ssh,pam.d}`` (below). ``down`` removes
everything but ``logs/`` (kept for post-mortems; ``down --purge`` removes it too).

Processes
---------
munged (user munge, ``--origin 10.77.0.1``) runs in the head network namespace, its socket
is shared with every node through the ``/run/munge`` bind. Agents
(``<venv>/bin/node-agent --config /etc/callerid-adopt/agent.toml``) run inside their node
with a clean environment plus ``NOTIFY_SOCKET``; ``up`` waits for their sd_notify
``READY=1``. Every lab daemon has a pid file and is stopped by pid (checked to still sit in
the lab's cgroups), never by name.

sshd
----
Each node runs three sshd (``up(sshd=True)``, the default), all with ``-D``, started with
``env -i PATH=...`` inside the node's namespaces and cgroup, sharing the node's ed25519
host key (``nodes/<node>/ssh/``):

* port 22,   PAM service ``lab-sshd-<node>``:      Debian's sshd stack (without pam_systemd,
  pam_selinux, pam_motd, pam_mail) + LAST ``-account required pam_python.so
  <repo>/pam/pam_adopt.py service=lab-sshd-<node> [options]`` (``set_pam`` changes them);
* port 2201, PAM service ``lab-sshd-<node>-none``: the same stack without pam_python;
* port 2202, PAM service ``lab-sshd-<node>-noop``: pam_python with ``deploy/lab/pam_noop.py``.

sshd names its PAM service after its argv[0]: ``<dir>/bin/lab-sshd-<node>[-none|-noop]``
are symlinks to /usr/sbin/sshd. The PAM files live in a copy of the host's /etc/pam.d made
at ``up`` (``nodes/<node>/pam.d``, bind-mounted over /etc/pam.d in the node: the host's
/etc/pam.d is never written). Config: ``nodes/<node>/ssh/sshd-<port>.conf``; only public
keys, ``AuthorizedKeysFile <dir>/ssh/authorized_keys/%u`` (users' home dirs and
/root/.ssh are never touched). The users alice, bob and root get a client key
``<dir>/ssh/keys/<user>``; inside every node ``/etc/ssh/ssh_config.d/lab.conf`` points ssh
at it and at ``<dir>/ssh/known_hosts`` (every node by name, IPv4 and IPv6, ports 22, 2201,
2202), so ``ssh node2 cmd``, ``ssh -p 2201 fd77::12 cmd`` work from any node without a
prompt. The client runs with ``LogLevel INFO``: at ERROR ssh hides the server's banner, and
with it PAM's account-phase message ("Access denied by pam_adopt: ..."). sshd has
``MaxStartups 256`` (tests start dozens of logins at once). sshd's privilege separation dir
/run/sshd is created if missing (shared, see above).

syslog
------
There is no syslog daemon on these machines. If ``/dev/log`` does not exist, ``up`` binds it
and hands the socket to a small listener (``lab.py _syslogd``, in the lab's head cgroup,
pid file ``pids/syslog.pid``) that learns each sender's pid with SO_PASSCRED, maps
``/proc/<pid>/ns/uts`` to the lab node of that UTS namespace (in whichever instance is up)
and appends ``<time> <node> <facility>.<level> <message>`` to that instance's
``logs/syslog.log``; a sender outside any lab node is ``host``, a sender already gone ``?``,
and those lines go to every instance's file. ``/dev/log`` is machine-wide, so ONE instance
owns the listener at a time and the others share it; when its owner goes down while other
instances are up, the listener moves into another instance's head cgroup (and pid file)
and keeps running; the last instance down stops it and removes ``/dev/log``. An existing
``/dev/log`` that is not the lab's (a real syslog daemon) is left alone and ``Lab.syslog()``
says so.
The socket queues DEVLOG_QUEUE (512) datagrams, as on a systemd node; see _devlog_socket.

Black holes
-----------
``Lab.blackhole(node, port)`` drops incoming TCP to that port in the node's network
namespace (nftables table ``inet <name>``, no RST: a connect times out); ``on=False``
and ``down`` remove it.

Users ``alice`` and ``bob`` are created if missing (GECOS "callerid-adopt lab user") and
kept at ``down``: removing accounts that may own files elsewhere is not the lab's call.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("lab")

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = Path(__file__).resolve().parent
DEFAULT_NAME = "cidlab"
DEFAULT_DIR = Path("/run/callerid-lab")
#: Owner file of the lab named DEFAULT_NAME; other names: owner_file(name).
OWNER_FILE = Path("/run/callerid-lab.owner")
#: flock'ed around every change to machine-wide state (owner files, shared things).
LOCK_FILE = Path("/run/callerid-lab.lock")
#: What labs created outside their dirs, shared by every instance up (see the docstring).
SHARED_FILE = Path("/run/callerid-lab.shared.json")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NAME_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
MAX_NAME = 24
HEAD = "head"
BRIDGE = "cidbr0"
#: The hierarchies the lab uses, by their directory under /sys/fs/cgroup. Never "memory".
HIERARCHIES = ("freezer", "pids", "cpuacct", "unified")
#: The v1 list written into agent.toml (same order as the spec's example).
AGENT_V1 = ("freezer", "cpuacct", "pids")
AGENT_PORT = 411
METRICS_PORT = 9817
LAB_USERS = ("alice", "bob")
SSH_USERS = ("alice", "bob", "root")
LAB_USER_GECOS = "callerid-adopt lab user"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_NODES = 200
AGENT_READY_TIMEOUT = 30.0
MUNGE_TIMEOUT = 10.0
NET_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0
SSHD_TIMEOUT = 10.0
#: sshd variants: name -> (port, suffix of the PAM service name).
SSHD_VARIANTS = {"adopt": (22, ""), "none": (2201, "-none"), "noop": (2202, "-noop")}
DEV_LOG = Path("/dev/log")
PRIVSEP_DIR = Path("/run/sshd")
PAM_ADOPT = REPO / "pam" / "pam_adopt.py"
PAM_NOOP = LAB_DIR / "pam_noop.py"
PAM_PYTHON_CANDIDATES = ("/usr/lib/security/pam_python.so", "/lib/security/pam_python.so",
                         "/usr/lib/x86_64-linux-gnu/security/pam_python.so",
                         "/lib/x86_64-linux-gnu/security/pam_python.so")
SYSTEM_PYTHON = "/usr/bin/python3"


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
SSHD = _tool("sshd")
SSH = _tool("ssh")
SSH_KEYGEN = _tool("ssh-keygen")
NFT = _tool("nft")


def _pam_python() -> str:
    for p in PAM_PYTHON_CANDIDATES:
        if os.path.exists(p):
            return p
    return PAM_PYTHON_CANDIDATES[0]


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

    def lab_root(self, lab: str = DEFAULT_NAME) -> Path:
        """``<hierarchy>/<lab name>``: the subtree of one lab instance."""
        return self.mountpoint / lab

    def group(self, name: str, lab: str = DEFAULT_NAME) -> Path:
        return self.lab_root(lab) / name


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
    """Write atomically (temp file + rename): readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
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


def _pid_in_lab(pid: int, name: str = DEFAULT_NAME) -> bool:
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"dir": text.strip()}


def check_name(name: str) -> str:
    if not (NAME_RE.fullmatch(name) and len(name) <= MAX_NAME):
        raise ValueError(f"lab name {name!r}: want lower-case letters, digits and single "
                         f"inner '-', starting with a letter, at most {MAX_NAME} characters")
    return name


def owner_file(name: str = DEFAULT_NAME) -> Path:
    """The file that names the state dir of the lab called ``name`` while it is up."""
    return OWNER_FILE if name == DEFAULT_NAME else Path(f"/run/callerid-lab.{name}.owner")


def default_dir(name: str = DEFAULT_NAME) -> Path:
    env = os.environ.get("CALLERID_LAB_DIR")
    if env:
        return Path(env)
    return DEFAULT_DIR if name == DEFAULT_NAME else Path("/run") / name


def _read_owner(name: str = DEFAULT_NAME) -> dict[str, Any] | None:
    """The owner file of lab ``name``: {"dir": its state dir, "name": name}."""
    return _read_json(owner_file(name))


def instances() -> dict[str, Path]:
    """Every lab instance with an owner file on this machine: name -> state dir."""
    out: dict[str, Path] = {}
    files = [OWNER_FILE, *sorted(Path("/run").glob("callerid-lab.*.owner"))]
    for f in files:
        data = _read_json(f)
        if data is None:
            continue
        name = DEFAULT_NAME if f == OWNER_FILE else f.name[len("callerid-lab."):-len(".owner")]
        out[str(data.get("name") or name)] = Path(data.get("dir") or "/nonexistent")
    return out


def live_instances() -> dict[str, Path]:
    """The instances that are up (or coming up): owner file + ``<dir>/lab.json``."""
    return {n: d for n, d in instances().items() if (d / "lab.json").exists()}


_lock_depth = 0


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """flock(LOCK_FILE): serialises changes to machine-wide lab state. Re-entrant."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    while True:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(LOCK_FILE).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the last lab down removed it while we waited: take the new one
            break
        os.close(fd)
    _lock_depth = 1
    try:
        yield
    finally:
        _lock_depth = 0
        os.close(fd)


def _load_shared() -> dict[str, Any]:
    return _read_json(SHARED_FILE) or {}


def _save_shared(data: Mapping[str, Any]) -> None:
    _write(SHARED_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _proc_net_addr(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} shows it (each 32-bit word in host byte order)."""
    packed = ipaddress.ip_address(ip).packed
    words = [packed[i:i + 4] for i in range(0, len(packed), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return "".join(w.hex().upper() for w in words) + f":{port:04X}"


def _listening(pid: int, addrs: Sequence[tuple[str, int]]) -> bool:
    """True if every (ip, port) is in LISTEN in the network namespace of pid."""
    want = {_proc_net_addr(ip, port) for ip, port in addrs}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            return False
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "0A":
                want.discard(f[1])
    return not want


def _ns_key(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Lab:
    """A multi-node lab in state dir ``dir``. See the module docstring for the layout."""

    def __init__(
        self,
        dir: str | Path | None = None,
        nodes: int = 2,
        venv: str | Path | None = None,
        agents: bool = True,
        *,
        name: str = DEFAULT_NAME,
        sshd: bool = True,
    ) -> None:
        self.name = check_name(name)
        if dir is None:
            dir = default_dir(name)
        self.dir = Path(os.path.realpath(dir))
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES}, not {nodes}")
        self.nodes: list[str] = [f"node{i}" for i in range(1, nodes + 1)]
        self.venv = Path(os.path.abspath(venv)) if venv is not None else REPO / ".venv"
        self.agents = agents  # what `with Lab(...)` passes to up()
        self.sshd = sshd  # likewise
        self._hier: list[Hierarchy] | None = None
        self._children: dict[int, subprocess.Popen[Any]] = {}  # daemons we started, to reap

    # ----------------------------------------------------------------- basics

    @classmethod
    def load(cls, dir: str | Path | None = None, name: str | None = None) -> Lab:
        """The lab described by ``<dir>/lab.json`` (written by ``up``); defaults if absent.

        Without ``dir``, the dir of lab ``name`` if it is up, else its default dir.
        """
        if dir is None and name is not None:
            owner = _read_owner(check_name(name))
            dir = owner.get("dir") if owner else None
        lab = cls(dir, name=name or DEFAULT_NAME)
        state = lab._load_state()
        if state:
            lab = cls(lab.dir, int(state.get("nodes", 2)), state.get("venv"),
                      bool(state.get("agents", True)),
                      name=str(state.get("name") or name or DEFAULT_NAME),
                      sshd=bool(state.get("sshd", False)))
        return lab

    def __enter__(self) -> Lab:
        self.up(agents=self.agents, sshd=self.sshd)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab({str(self.dir)!r}, nodes={len(self.nodes)}, name={self.name!r})"

    @property
    def hierarchies(self) -> list[Hierarchy]:
        if self._hier is None:
            self._hier = discover_hierarchies()
        return self._hier

    def cgroup(self, h: Hierarchy, group: str | None = None) -> Path:
        """``<hierarchy>/<name>[/<group>]``: the lab's subtree, or one group of it."""
        root = h.lab_root(self.name)
        return root / group if group else root

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
        return f"{self.name}-{node}"

    def netns_path(self, node: str) -> Path:
        return NETNS_DIR / self.netns(node)

    def ns_file(self, node: str, kind: str) -> Path:
        return self.dir / "ns" / node / kind

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def venv_bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def owner_file(self) -> Path:
        return owner_file(self.name)

    @property
    def munge_socket(self) -> Path:
        """The munged socket as seen on the host; nodes see it as /run/munge/munge.socket.2."""
        return self.dir / "munge" / "run" / "munge.socket.2"

    def is_up(self) -> bool:
        return self._load_state().get("state") == "up"

    # ------------------------------------------------------------- commands

    def _move_self(self, group: str) -> str:
        """Shell text that moves the shell into ``<name>/<group>`` of every lab hierarchy."""
        procs = [self.cgroup(h, group) / "cgroup.procs" for h in self.hierarchies]
        return " && ".join(f"echo $$ >{shlex.quote(str(p))}" for p in procs) or ":"

    def _enter(self, group: str, nsenter_args: Sequence[str], argv: Sequence[str]) -> list[str]:
        return [SH, "-c", f'{self._move_self(group)} && exec "$@"', f"lab-{group}", NSENTER,
                *nsenter_args, "--", *argv]

    def _node_ns_args(self, node: str) -> list[str]:
        return [
            f"--net={self.netns_path(node)}",
            f"--uts={self.ns_file(node, 'uts')}",
            f"--mount={self.ns_file(node, 'mnt')}",
            f"--cgroup={self.ns_file(node, 'cgroup')}",
        ]

    def cmd(
        self,
        node: str,
        argv: Sequence[str],
        user: str | int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> list[str]:
        """The full argv that runs ``argv`` inside ``node`` (pure: nothing is executed).

        The process moves itself into ``<name>/<node>`` of each lab hierarchy, enters the
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
        return self._enter(node, self._node_ns_args(node), inner)

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

    @staticmethod
    def _require_root() -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, cgroups, mounts)")

    def _claim(self, state: Mapping[str, Any]) -> Path | None:
        """Under the machine lock: take the name for this dir (owner file + lab.json).

        Returns None once claimed, or the dir of a lab of this name that must go down
        first (this dir, half up: rebuilt; another dir without lab.json: stale leftovers).
        """
        prev = self._load_state()
        prev_name = str(prev.get("name", DEFAULT_NAME))
        if prev.get("state") and prev_name != self.name:
            if instances().get(prev_name) == self.dir:
                raise LabError(f"{self.dir} holds the lab {prev_name!r}; run "
                               f"`lab.py --dir {self.dir} down` first")
            return self.dir  # leftovers of a lab of another name in this dir
        owner = _read_owner(self.name)
        if owner is not None:
            other = Path(owner.get("dir") or "/nonexistent")
            if other != self.dir and (other / "lab.json").exists():
                raise LabError(
                    f"another lab named {self.name!r} is up at {other}; run "
                    f"`lab.py --name {self.name} --dir {other} down` first")
            return other
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._save_state(state)
        _write(self.owner_file, json.dumps({"dir": str(self.dir), "name": self.name}) + "\n")
        return None

    # -------------------------------------------------------------------- up

    def up(self, agents: bool = True, sshd: bool = True) -> None:
        """Build the lab (idempotent: a lab already up in this dir is rebuilt).

        On any failure everything already built is torn down before the error propagates.
        """
        self._require_root()
        tools = [NSENTER, UNSHARE, SETPRIV, ENV, IP, MOUNT, UMOUNT, MUNGED, MUNGEKEY, USERADD]
        if sshd:
            tools += [SSHD, SSH, SSH_KEYGEN]
        missing = [t for t in tools if not os.path.isabs(t)]
        if sshd and not os.path.exists(_pam_python()):
            missing.append("pam_python.so (libpam-python)")
        if missing:
            raise LabError(f"missing tools {missing}: run deploy/install-deps.sh")
        t0 = time.monotonic()
        state: dict[str, Any] = {
            "state": "starting", "name": self.name, "nodes": len(self.nodes),
            "venv": str(self.venv), "agents": agents, "sshd": sshd,
        }
        for _ in range(3):
            with machine_lock():
                stale = self._claim(state)
            if stale is None:
                break
            if stale == self.dir:
                log.info("the lab at %s is already up or half up: tearing it down first",
                         self.dir)
                Lab.load(self.dir).down()
            else:
                log.warning("taking over leftovers of a stale lab %s at %s", self.name, stale)
                Lab(stale, name=self.name).down()
        else:
            raise LabError(f"could not take {self.owner_file}")
        try:
            with machine_lock():
                # Leftovers nobody owns (a crash before the owner file existed) are ours.
                if self._leftovers():
                    log.warning("clearing leftovers of an earlier lab %s", self.name)
                    self._release_logger()
                    self._teardown_global()
                self._ensure_shared(sshd)
                self._ensure_users()
            self._make_dirs(sshd)
            self._save_state(state)
            self._compile_checkout()
            self._make_cgroups()
            with machine_lock():
                state["syslog"] = self._ensure_logger()
            self._save_state(state)
            keygen = self._start_keygen() if sshd else []
            self._make_network()
            self._make_nodes(sshd)
            self._start_munged()
            sshds: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
            if sshd:
                self._make_ssh(keygen)
                sshds = self._spawn_sshds()
            if agents:
                self.agents_start(self.nodes)
            if sshd:
                self._wait_sshds(sshds)
            state["state"] = "up"
            self._save_state(state)
        except BaseException:
            log.error("lab up failed: tearing down")
            try:
                self.down()
            except Exception:  # keep the original error visible
                log.exception("down after a failed up also failed")
            raise
        log.info("lab %s up at %s: %s (%.2f s)", self.name, self.dir, ", ".join(self.nodes),
                 time.monotonic() - t0)

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

    def _ensure_shared(self, sshd: bool) -> None:
        """Under the machine lock: host-side dirs the nodes need, recorded as shared."""
        shared = _load_shared()
        created: list[str] = shared.setdefault("created_dirs", [])
        if not NETNS_DIR.exists():
            shared["created_netns_dir"] = True
        needed = [t for _, t in self._mount_points(self.nodes[0], sshd)]
        if sshd:
            needed.append(PRIVSEP_DIR)
        for target in needed:
            if not target.exists():
                if str(target) not in created:
                    created.append(str(target))
                _save_shared(shared)  # before creating it: a failure must still undo it
                target.mkdir(mode=0o755, parents=True)
        _save_shared(shared)

    def _make_dirs(self, sshd: bool) -> None:
        d = self.dir
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged (and sshd's StrictModes) check every parent of its files
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
        if sshd:
            for sub in ("bin", "ssh", "ssh/keys", "ssh/authorized_keys", "ssh/ssh_config.d"):
                (d / sub).mkdir(mode=0o755, exist_ok=True)
                os.chmod(d / sub, 0o755)
            for node in self.nodes:
                (self.node_dir(node) / "ssh").mkdir(mode=0o755, exist_ok=True)
                pam = self.node_dir(node) / "pam.d"
                shutil.copytree("/etc/pam.d", pam, symlinks=True, dirs_exist_ok=True)

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
            f'login_services = ["{self.pam_service(node)}"]',
            # loopback only: the metrics say who logs in where; other nodes need not see them
            f'metrics_listen = "127.0.0.1:{METRICS_PORT}"',
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
                self.cgroup(h, group).mkdir(parents=True, exist_ok=True)

    def _make_network(self) -> None:
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

    def _mount_points(self, node: str, sshd: bool) -> list[tuple[Path, Path]]:
        """(source on the host, target inside the node) of the node's bind mounts."""
        nd = self.node_dir(node)
        out = [
            (self.dir / "hosts", Path("/etc/hosts")),
            (nd / "etc", Path("/etc/callerid-adopt")),
            (nd / "run", Path("/run/callerid-adopt")),
            (nd / "state", Path("/var/lib/callerid-adopt")),
            (self.dir / "munge" / "run", Path("/run/munge")),
        ]
        if sshd:
            out += [(nd / "pam.d", Path("/etc/pam.d")),
                    (self.dir / "ssh" / "ssh_config.d", Path("/etc/ssh/ssh_config.d"))]
        return out

    def _make_nodes(self, sshd: bool) -> None:
        (self.dir / "munge" / "run").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            script = ["set -e", f"echo {node} >/proc/sys/kernel/hostname"]
            for h in self.hierarchies:
                mp = shlex.quote(str(h.mountpoint))
                script.append(f"{UMOUNT} {mp}")
                if h.fstype == "cgroup":
                    script.append(f"{MOUNT} -t cgroup -o {shlex.quote(h.options)} cgroup {mp}")
                else:
                    script.append(f"{MOUNT} -t cgroup2 cgroup2 {mp}")
            for src, target in self._mount_points(node, sshd):
                script.append(f"{MOUNT} --bind {shlex.quote(str(src))} {shlex.quote(str(target))}")
            # No references to other nodes' namespaces (this lab's or another instance's).
            script.append(f"{UMOUNT} -l {shlex.quote(str(self.dir / 'ns'))}")
            script.append(f"if mountpoint -q {NETNS_DIR}; then {UMOUNT} -l {NETNS_DIR}; fi")
            script.append(
                r"for m in $(sed -n 's/^[^ ]* [^ ]* [^ ]* [^ ]* \([^ ]*\) .* - nsfs .*/\1/p'"
                f" /proc/self/mountinfo | sort -r); do {UMOUNT} -l \"$m\" 2>/dev/null || :; done")
            argv = [
                SH, "-c", self._move_self(node) + ' && exec "$@"',
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
               env: Mapping[str, str] | None = None,
               pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:
            p = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(env) if env else {"PATH": PATH},
                pass_fds=tuple(pass_fds),
            )
        self._children[p.pid] = p
        _write(pidfile, f"{p.pid}\n")
        return p

    # ------------------------------------------------------------------- ssh

    def pam_service(self, node: str, variant: str = "adopt") -> str:
        """The PAM service of a node's sshd: ``lab-sshd-<node>[-none|-noop]``."""
        self.index(node)
        if variant not in SSHD_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(SSHD_VARIANTS)}: {variant!r}")
        return f"lab-sshd-{node}{SSHD_VARIANTS[variant][1]}"

    def sshd_port(self, variant: str = "adopt") -> int:
        return SSHD_VARIANTS[variant][0]

    def _sshd_conf(self, node: str, variant: str) -> Path:
        return self.node_dir(node) / "ssh" / f"sshd-{self.sshd_port(variant)}.conf"

    def _sshd_pidfile(self, node: str, variant: str) -> Path:
        return self.dir / "pids" / f"{self.pam_service(node, variant)[4:]}.pid"

    def _sshd_logfile(self, node: str, variant: str) -> Path:
        return self.dir / "logs" / f"{self.pam_service(node, variant)[4:]}.log"

    def _host_key(self, node: str) -> Path:
        return self.node_dir(node) / "ssh" / "ssh_host_ed25519_key"

    def client_key(self, user: str) -> Path:
        """The private key of a lab user (alice, bob, root) on the host."""
        return self.dir / "ssh" / "keys" / user

    def _start_keygen(self) -> list[subprocess.Popen[bytes]]:
        """Start ssh-keygen for every host key and client key (they run in parallel)."""
        jobs = [(self._host_key(n), f"{n}@{self.name}") for n in self.nodes]
        jobs += [(self.client_key(u), f"{u}@{self.name}") for u in SSH_USERS]
        procs = []
        for path, comment in jobs:
            for p in (path, path.with_name(path.name + ".pub")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            procs.append(subprocess.Popen(
                [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={"PATH": PATH}))
        return procs

    def _strict_modes(self) -> bool:
        """sshd's StrictModes needs every dir above the key files writable by root only."""
        p = self.dir / "ssh" / "authorized_keys"
        for d in [p, *p.parents]:
            st = os.stat(d)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
        return True

    def sshd_config(self, node: str, variant: str = "adopt") -> str:
        """The sshd config of one of the node's sshd (written to nodes/<node>/ssh/)."""
        port = self.sshd_port(variant)
        strict = self._strict_modes() if self.dir.exists() else True
        return "\n".join([
            f"# written by deploy/lab/lab.py: {node}, PAM service "
            f"{self.pam_service(node, variant)}",
            f"ListenAddress {self.ip(node)}:{port}",
            f"ListenAddress [{self.ip(node, 6)}]:{port}",
            f"HostKey {self._host_key(node)}",
            f"PidFile {self.dir / 'run' / (self.pam_service(node, variant) + '.pid')}",
            "UsePAM yes",
            "UseDNS no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"AuthorizedKeysFile {self.dir / 'ssh' / 'authorized_keys'}/%u",
            "PrintMotd no",
            f"StrictModes {'yes' if strict else 'no'}",
            "LogLevel VERBOSE",
            # Tests start ~50 logins at once per sshd: the default (10:30:100) drops
            # unauthenticated connections beyond 10 at random.
            "MaxStartups 256",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "",
        ])

    def pam_stack(self, node: str, variant: str = "adopt", options: Sequence[str] = ()) -> str:
        """The PAM file of a node's sshd: Debian's sshd stack without pam_systemd,
        pam_selinux, pam_motd and pam_mail, plus (last in account) pam_adopt, pam_noop or
        nothing."""
        service = self.pam_service(node, variant)
        for o in options:
            if not o or any(c.isspace() for c in o) or "[" in o or "]" in o:
                raise ValueError(f"bad PAM module option {o!r}")
        lines = [
            f"# {service}: written by deploy/lab/lab.py (variant {variant}).",
            "# Debian's sshd stack without pam_systemd, pam_selinux, pam_motd, pam_mail.",
            "@include common-auth",
            "account    required     pam_nologin.so",
            "@include common-account",
        ]
        if variant == "adopt":
            lines.append(f"-account   required     {_pam_python()} {PAM_ADOPT} "
                         + " ".join([f"service={service}", *options]))
        elif variant == "noop":
            lines.append(f"-account   required     {_pam_python()} {PAM_NOOP}")
        lines += [
            "session    required     pam_loginuid.so",
            "session    optional     pam_keyinit.so force revoke",
            "@include common-session-noninteractive",
            "session    required     pam_limits.so",
            "session    required     pam_env.so",
        ]
        if os.path.exists("/etc/default/locale"):
            lines.append("session    required     pam_env.so envfile=/etc/default/locale")
        lines += ["@include common-password", ""]
        return "\n".join(lines)

    def set_pam(self, node: str, options: Sequence[str] = ()) -> None:
        """Rewrite the node's ``lab-sshd-<node>`` PAM file: pam_adopt with these options
        (after ``service=lab-sshd-<node>``). Atomic; PAM reads it at the next login."""
        text = self.pam_stack(node, "adopt", list(options))
        pam = self.node_dir(node) / "pam.d"
        if not pam.is_dir():
            raise LabError(f"{pam} does not exist: is the lab up with sshd?")
        _write(pam / self.pam_service(node), text)

    def _make_ssh(self, keygen: Sequence[subprocess.Popen[bytes]]) -> None:
        """Keys, known_hosts, client config, sshd configs, PAM files, argv[0] symlinks."""
        for p in keygen:
            _, err = p.communicate(timeout=30)
            if p.returncode != 0:
                raise LabError(f"{p.args!r} failed: {err.decode(errors='replace')}")
        d = self.dir
        for user in SSH_USERS:
            pw = pwd.getpwnam(user)
            key = self.client_key(user)
            os.chown(key, pw.pw_uid, pw.pw_gid)
            os.chmod(key, 0o600)
            os.chmod(key.with_name(user + ".pub"), 0o644)
            _write(d / "ssh" / "authorized_keys" / user,
                   key.with_name(user + ".pub").read_text())
        known = []
        for node in self.nodes:
            pub = " ".join(self._host_key(node).with_name(
                "ssh_host_ed25519_key.pub").read_text().split()[:2])
            hosts = [node, self.ip(node), self.ip(node, 6)]
            known.append(",".join(hosts) + " " + pub)
            for variant in ("none", "noop"):
                port = self.sshd_port(variant)
                known.append(",".join(f"[{h}]:{port}" for h in hosts) + " " + pub)
        _write(d / "ssh" / "known_hosts", "\n".join(known) + "\n")
        _write(d / "ssh" / "ssh_config.d" / "lab.conf", "\n".join([
            "# written by deploy/lab/lab.py: the ssh client inside the lab's nodes",
            f"IdentityFile {d / 'ssh' / 'keys'}/%u",
            f"GlobalKnownHostsFile {d / 'ssh' / 'known_hosts'}",
            "UserKnownHostsFile /dev/null",
            "StrictHostKeyChecking yes",
            "BatchMode yes",
            "CheckHostIP no",
            "ConnectTimeout 10",
            # INFO, not ERROR: ssh shows the server's banner, and thus PAM's account-phase
            # message ("Access denied by pam_adopt: ..."), only at INFO and above.
            "LogLevel INFO",
            "",
        ]))
        for node in self.nodes:
            pam = self.node_dir(node) / "pam.d"
            nonint = pam / "common-session-noninteractive"
            if nonint.exists() and "pam_systemd" in nonint.read_text():
                _write(nonint, "".join(line for line in nonint.read_text().splitlines(True)
                                       if "pam_systemd" not in line))
            for variant in SSHD_VARIANTS:
                _write(pam / self.pam_service(node, variant), self.pam_stack(node, variant))
                _write(self._sshd_conf(node, variant), self.sshd_config(node, variant))
                link = d / "bin" / self.pam_service(node, variant)
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()
                link.symlink_to(os.path.realpath(SSHD))

    def _spawn_sshds(self) -> dict[tuple[str, str], subprocess.Popen[bytes]]:
        procs = {}
        for node in self.nodes:
            for variant in SSHD_VARIANTS:
                procs[(node, variant)] = self._spawn_sshd(node, variant)
        return procs

    def _spawn_sshd(self, node: str, variant: str) -> subprocess.Popen[bytes]:
        logf = self._sshd_logfile(node, variant)
        argv = self._enter(node, self._node_ns_args(node), [
            ENV, "-i", f"PATH={PATH}", str(self.dir / "bin" / self.pam_service(node, variant)),
            "-D", "-f", str(self._sshd_conf(node, variant)), "-E", str(logf),
        ])
        return self._spawn(argv, logf, self._sshd_pidfile(node, variant))

    def _wait_sshds(self, procs: Mapping[tuple[str, str], subprocess.Popen[bytes]]) -> None:
        """Wait until every sshd listens on its IPv4 and IPv6 address (seen in its netns)."""
        deadline = time.monotonic() + SSHD_TIMEOUT
        waiting = dict(procs)
        while waiting:
            for (node, variant), p in list(waiting.items()):
                port = self.sshd_port(variant)
                if _listening(p.pid, [(self.ip(node), port), (self.ip(node, 6), port)]):
                    del waiting[(node, variant)]
                    continue
                if p.poll() is not None:
                    why = f"exited with rc={p.returncode}"
                elif time.monotonic() > deadline:
                    why = f"does not listen after {SSHD_TIMEOUT:.0f} s"
                else:
                    continue
                logf = self._sshd_logfile(node, variant)
                raise LabError(f"sshd {self.pam_service(node, variant)} {why}; tail of "
                               f"{logf}:\n{_tail(logf)}")
            if waiting:
                time.sleep(0.005)

    def sshd_pid(self, node: str, variant: str = "adopt") -> int | None:
        """The pid of a node's sshd listener if it runs."""
        pid = _read_pid(self._sshd_pidfile(node, variant))
        if pid is None or not _pid_alive(pid) or not _pid_in_lab(pid, self.name):
            return None
        return pid

    def sshd_log(self, node: str, variant: str = "adopt") -> str:
        """sshd's own log (LogLevel VERBOSE) of one of the node's sshd."""
        try:
            return self._sshd_logfile(node, variant).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ssh_argv(self, to_node: str, argv: Sequence[str] | str, *, port: int = 22,
                 family: int = 4, options: Sequence[str] = ()) -> list[str]:
        """``ssh [-p PORT] [-o OPT]... HOST CMD``: to run with ``run``/``popen`` in a node.

        HOST is the node's IPv4 (``family=4``) or IPv6 (``6``) address, or its name
        (``0``). A list ``argv`` is quoted for the remote shell (``shlex.join``), so it
        arrives as the same argv; a string is sent as it is.
        """
        self.index(to_node)
        host = to_node if family == 0 else self.ip(to_node, family)
        out = [SSH]
        if port != 22:
            out += ["-p", str(port)]
        for o in options:
            out += ["-o", o]
        out.append(host)
        if isinstance(argv, str):
            out.append(argv)
        elif argv:
            out.append(shlex.join(argv))
        return out

    # ---------------------------------------------------------------- syslog

    def _ensure_logger(self) -> str:
        """Under the machine lock: make sure someone listens on /dev/log.

        Returns "lab" (the lab's listener: ours or another instance's) or "external".
        """
        shared = _load_shared()
        dl = shared.get("devlog")
        try:
            st: os.stat_result | None = os.lstat(DEV_LOG)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not dl or dl.get("ino") != st.st_ino or not stat.S_ISSOCK(st.st_mode):
                return "external"
            if self._logger_pid(dl) is not None:
                return "lab"
            log.warning("%s is a stale socket of the lab's syslog listener: replacing it",
                        DEV_LOG)
            DEV_LOG.unlink()
        sock = _devlog_socket()
        try:
            sock.bind(str(DEV_LOG))
            os.chmod(DEV_LOG, 0o666)
            shared["devlog"] = {"ino": os.lstat(DEV_LOG).st_ino, "name": self.name,
                                "dir": str(self.dir)}
            _save_shared(shared)
            fd = sock.fileno()
            argv = [SH, "-c", f'{self._move_self(HEAD)} && exec "$@"', "lab-syslog",
                    SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable,
                    "-I", str(Path(__file__).resolve()), "_syslogd", str(fd)]
            self._spawn(argv, self.dir / "logs" / "syslogd.out",
                        self.dir / "pids" / "syslog.pid", pass_fds=[fd])
        finally:
            sock.close()
        return "lab"

    @staticmethod
    def _logger_pid(dl: Mapping[str, Any]) -> int | None:
        pid = _read_pid(Path(dl.get("dir", "/nonexistent")) / "pids" / "syslog.pid")
        if pid is None or not _pid_alive(pid) or not _pid_in_lab(pid, str(dl.get("name"))):
            return None
        return pid

    def _release_logger(self) -> None:
        """Under the machine lock, before this lab's cgroups are swept: if this lab runs
        the /dev/log listener, hand it to another instance that is up, else stop it."""
        shared = _load_shared()
        dl = shared.get("devlog")
        if not dl or dl.get("name") != self.name:
            return
        pid = self._logger_pid(dl)
        others = {n: d for n, d in live_instances().items() if n != self.name}
        if pid is not None and others:
            name, d = sorted(others.items())[0]
            for h in self.hierarchies:
                group = h.group(HEAD, name)
                group.mkdir(parents=True, exist_ok=True)
                (group / "cgroup.procs").write_text(f"{pid}\n")
            (d / "pids").mkdir(mode=0o755, parents=True, exist_ok=True)
            _write(d / "pids" / "syslog.pid", f"{pid}\n")
            shared["devlog"] = {**dl, "name": name, "dir": str(d)}
            _save_shared(shared)
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "pids" / "syslog.pid").unlink()
            self._children.pop(pid, None)
            log.info("syslog listener (pid %d) handed over to lab %s", pid, name)
            return
        if pid is not None:
            self._stop_pidfile(Path(dl["dir"]) / "pids" / "syslog.pid", signal.SIGTERM, True,
                               5.0, str(dl["name"]))
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(DEV_LOG).st_ino == dl.get("ino"):
                DEV_LOG.unlink()
        shared.pop("devlog", None)
        _save_shared(shared)

    def syslog(self) -> str:
        """What the lab's /dev/log listener got from this lab's nodes (and the host)."""
        try:
            text = (self.dir / "logs" / "syslog.log").read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if self._load_state().get("syslog") == "external":
            text = (f"(lab: {DEV_LOG} belongs to a syslog daemon the lab did not start: "
                    "messages logged in the nodes are in that daemon's logs)\n" + text)
        return text

    # ------------------------------------------------------------- blackhole

    def blackhole(self, node: str, port: int = AGENT_PORT, on: bool = True) -> None:
        """Drop incoming TCP to ``port`` in the node's netns (no RST), or stop dropping.

        nftables table ``inet <name>`` in the node's network namespace, one rule for all
        black-holed ports; the table goes when the last port is released (and at down).
        """
        self._require_root()
        self.index(node)
        if not os.path.isabs(NFT):
            raise LabError("nft not found: run deploy/install-deps.sh (package nftables)")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        state = self._load_state()
        if state.get("state") not in ("starting", "up"):
            raise LabError(f"no lab is up at {self.dir}")
        holes: dict[str, list[int]] = state.setdefault("blackholes", {})
        ports = set(holes.get(node, []))
        if on:
            ports.add(port)
        else:
            ports.discard(port)
        self._apply_blackholes(node, sorted(ports))
        if ports:
            holes[node] = sorted(ports)
        else:
            holes.pop(node, None)
        self._save_state(state)

    def _apply_blackholes(self, node: str, ports: Sequence[int]) -> None:
        table = f"inet {self.name}"
        rules = [f"table {table}", f"delete table {table}"]  # atomic replace, ok if absent
        if ports:
            rules += [
                f"table {table} {{",
                "    chain input {",
                "        type filter hook input priority filter; policy accept;",
                f"        tcp dport {{ {', '.join(map(str, ports))} }} drop",
                "    }",
                "}",
            ]
        _run_host([NSENTER, f"--net={self.netns_path(node)}", "--", NFT, "-f", "-"],
                  input="\n".join(rules) + "\n")

    def blackholes(self) -> dict[str, list[int]]:
        return dict(self._load_state().get("blackholes", {}))

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
        if pid is None or not _pid_alive(pid) or not _pid_in_lab(pid, self.name):
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
                      timeout: float = STOP_TIMEOUT, name: str | None = None) -> None:
        pid = _read_pid(pidfile)
        if pid is None:
            return
        if _pid_alive(pid) and _pid_in_lab(pid, name or self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if wait and not self._wait_dead(pid, timeout) and sig != signal.SIGKILL:
                log.warning("pid %d (%s) ignored signal %d for %.0f s: SIGKILL", pid,
                            pidfile.name, sig, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_dead(pid, 5)
        elif _pid_alive(pid):
            log.warning("%s names pid %d, which is not in a cgroup of lab %s: left alone",
                        pidfile, pid, name or self.name)
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

        Keeps ``<dir>/logs`` unless ``purge``. If another live lab of the same name owns
        the name, only this dir's files are cleaned and its resources are left alone. The
        last instance down also removes what labs share on the machine.
        """
        self._require_root()
        t0 = time.monotonic()
        state = self._load_state()
        mine = self._owns_name()
        errors: list[str] = []

        def step(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: tear down as much as possible
                log.error("down: %s: %s", what, e)
                errors.append(f"{what}: {e}")

        if mine:
            with machine_lock():
                step("syslog listener", self._release_logger)
            pids = self.dir / "pids"
            if pids.is_dir():
                sshds = sorted(pids.glob("sshd-*.pid"))
                for pf in sshds:  # all at once, then wait: they exit at once on SIGTERM
                    step(f"stop {pf.name}", self._stop_pidfile, pf, signal.SIGTERM, False)
                for pf in sshds:
                    step(f"stop {pf.name}", self._stop_pidfile, pf, signal.SIGTERM, True, 5.0)
                for pf in sorted(pids.glob("agent-*.pid")):
                    step(f"stop {pf.name}", self._stop_pidfile, pf, signal.SIGTERM, True, 5.0)
                step("stop munged", self._stop_pidfile, pids / "munged.pid", signal.SIGTERM,
                     True, 5.0)
            for node in state.get("blackholes", {}):
                if node in self.nodes and self.netns_path(node).exists():
                    step(f"nft table in {node}", self._apply_blackholes, node, [])
            step("kill leftover lab processes", self._kill_cgroups)
        step("unmount", self._unmount_dir)
        if mine:
            step("global teardown", self._teardown_global)
            with machine_lock():
                step("machine-wide teardown", self._release_machine)
        step("remove state dir", self._remove_dir, purge)
        for pid in list(self._children):
            self._reap(pid)
        if errors:
            raise LabError("down left things behind:\n  " + "\n  ".join(errors))
        log.info("lab %s down at %s (%.2f s)", self.name, self.dir, time.monotonic() - t0)

    def _owns_name(self) -> bool:
        owner = _read_owner(self.name)
        if owner is None:
            return True  # nobody claims it: leftovers, if any, are stale
        other = Path(owner.get("dir") or "/nonexistent")
        if other == self.dir or not (other / "lab.json").exists():
            return True
        log.warning("lab %s belongs to %s: only cleaning %s", self.name, other, self.dir)
        return False

    def _release_machine(self) -> None:
        """Under the machine lock: give up the name; the last lab down removes the shared
        things (the /dev/log listener, mount-point dirs, /run/sshd, /run/netns)."""
        shared = _load_shared()
        before = dict(shared)
        owner = _read_owner(self.name) or {}
        created = list(shared.get("created_dirs", []))
        for d in owner.get("created_dirs", []):  # an owner file from before instances
            if d not in created:
                created.append(d)
        if owner.get("created_netns_dir"):
            shared["created_netns_dir"] = True
        if created:
            shared["created_dirs"] = created
        with contextlib.suppress(FileNotFoundError):
            self.owner_file.unlink()
        if live_instances():
            if shared != before:
                _save_shared(shared)
            return
        errors = []
        dl = shared.get("devlog")
        if dl:  # a listener left by an instance that is gone
            pid = self._logger_pid(dl)
            if pid is not None:
                self._stop_pidfile(Path(dl["dir"]) / "pids" / "syslog.pid", signal.SIGTERM,
                                   True, 5.0, str(dl["name"]))
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(DEV_LOG).st_ino == dl.get("ino"):
                    DEV_LOG.unlink()
        if shared.get("created_netns_dir") and NETNS_DIR.is_dir() and not self._netns_names():
            while _is_mount(NETNS_DIR):
                if _run_host([UMOUNT, str(NETNS_DIR)], check=False).returncode != 0:
                    break
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()
        for d in reversed(created):
            with contextlib.suppress(FileNotFoundError):
                try:
                    Path(d).rmdir()
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        errors.append(f"rmdir {d}: {e}")
                    else:
                        log.warning("%s (created by the lab) is not empty: left in place", d)
        with contextlib.suppress(FileNotFoundError):
            SHARED_FILE.unlink()
        with contextlib.suppress(FileNotFoundError):
            LOCK_FILE.unlink()  # we hold it: waiters notice the new inode and retry
        if errors:
            raise LabError("; ".join(errors))

    def _leftovers(self) -> bool:
        if any(self.cgroup(h).exists() for h in self.hierarchies):
            return True
        return any(self._is_my_netns(n) for n in self._netns_names())

    def _is_my_netns(self, name: str) -> bool:
        rest = name[len(self.name) + 1:] if name.startswith(self.name + "-") else ""
        return rest == HEAD or re.fullmatch(r"node[1-9][0-9]*", rest) is not None

    @staticmethod
    def _netns_names() -> list[str]:
        try:
            return sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []

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
        """Thaw every frozen v1 freezer cgroup of the lab (e.g. a job the agent froze)."""
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

    def _teardown_global(self) -> None:
        """Kill this lab's processes, remove its cgroups and network namespaces."""
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
            if self._is_my_netns(name):
                r = _run_host([IP, "netns", "delete", name], check=False)
                if r.returncode != 0:
                    errors.append(f"ip netns delete {name}: {r.stderr.strip()}")
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
        dl = _load_shared().get("devlog") or {}
        return {
            "name": self.name,
            "dir": str(self.dir),
            "state": state.get("state", "down"),
            "owner": (_read_owner(self.name) or {}).get("dir"),
            "instances": {n: str(d) for n, d in live_instances().items()},
            "munged": {"pid": munged, "alive": munged is not None and _pid_alive(munged)},
            "syslog": {"mode": state.get("syslog"), "listener_owner": dl.get("name")},
            "blackholes": state.get("blackholes", {}),
            "nodes": {
                node: {
                    "ipv4": self.ip(node), "ipv6": self.ip(node, 6),
                    "netns": self.netns_path(node).exists(),
                    "agent_pid": self.agent_pid(node),
                    "sshd_pids": {v: self.sshd_pid(node, v) for v in SSHD_VARIANTS}
                    if state.get("sshd") else {},
                }
                for node in self.nodes
            },
        }


# ------------------------------------------------------------ syslog listener

FACILITIES = {0: "kern", 1: "user", 2: "mail", 3: "daemon", 4: "auth", 5: "syslog", 6: "lpr",
              7: "news", 8: "uucp", 9: "cron", 10: "authpriv", 11: "ftp"}
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_BSD_TIME = re.compile(r"[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d ")
#: A sender gone by the time its message is read keeps the node it logged from before
#: for this long (pids wrap at 32768 here: far longer than this).
RECENT_PIDS = 60.0


#: How many datagrams /dev/log queues for the listener. The kernel's default
#: (net.unix.max_dgram_qlen) is 10, which a burst of logins overflows at once: senders then
#: block, and pam_adopt gives up on a line after 0.2 s. systemd raises it to 512 on real
#: nodes (sysctl.d/50-default.conf), which the lab copies without touching the host's value.
DEVLOG_QUEUE = 512
CLONE_NEWNET = 0x40000000


def _devlog_socket() -> socket.socket:
    """The /dev/log datagram socket, queueing DEVLOG_QUEUE datagrams.

    A unix socket takes its queue length from net.unix.max_dgram_qlen of the network
    namespace it is created in. So it is made by a thread that unshares a network
    namespace of its own and raises the value there; the socket keeps that namespace
    alive, and /dev/log is reached by path, from any namespace. If that fails, the
    socket is made here, with the host's queue length, and a warning.
    """
    made: list[socket.socket] = []
    problem: list[str] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            Path("/proc/sys/net/unix/max_dgram_qlen").write_text(f"{DEVLOG_QUEUE}\n")
            made.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        except OSError as e:  # the thread ends here: its namespace goes with it
            problem.append(str(e))

    worker = threading.Thread(target=make, name="devlog-netns")
    worker.start()
    worker.join()
    if made:
        return made[0]
    log.warning("/dev/log keeps the host's queue length (a burst of logins may lose "
                "syslog lines): %s", problem[0] if problem else "?")
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


def format_syslog(data: bytes, node: str, now: float | None = None) -> str:
    """One line of syslog.log: ``<time> <node> <facility>.<level> <message>``."""
    text = data.decode(errors="replace").rstrip("\n\0")
    m = re.match(r"<(\d{1,3})>", text)
    where = "user.notice"
    if m:
        pri = int(m.group(1))
        where = f"{FACILITIES.get(pri >> 3, f'local{(pri >> 3) - 16}')}.{SEVERITIES[pri & 7]}"
        text = text[m.end():]
        t = _BSD_TIME.match(text)
        if t:
            text = text[t.end():]
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    text = text.replace("\n", "\\n")
    return f"{stamp} {node} {where} {text}\n"


def syslogd(fd: int) -> int:
    """The /dev/log listener (``lab.py _syslogd FD``): FD is the bound datagram socket."""
    sock = socket.socket(fileno=fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    host = _ns_key("/proc/self/ns/uts")
    nodes: dict[tuple[int, int], tuple[str, Path]] = {}
    recent: dict[int, tuple[tuple[int, int], float]] = {}  # pid -> its UTS ns, when seen
    dirs: list[Path] = []
    scanned = 0.0

    def rescan() -> None:
        nonlocal scanned
        nodes.clear()
        dirs.clear()
        for _, d in sorted(live_instances().items()):
            dirs.append(d)
            with contextlib.suppress(OSError):
                for nd in (d / "ns").iterdir():
                    key = _ns_key(nd / "uts")
                    if key is not None:
                        nodes[key] = (nd.name, d)
        scanned = time.monotonic()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    creds = struct.calcsize("3i")
    while True:
        data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(creds))
        try:
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            key = _ns_key(f"/proc/{pid}/ns/uts") if pid else None
            now = time.monotonic()
            if key is not None and key != host and key not in nodes:
                rescan()
            elif now - scanned > 5:
                rescan()
            if key is None and pid in recent and now - recent[pid][1] < RECENT_PIDS:
                key = recent[pid][0]  # gone since its last message (e.g. "session closed")
            if key is not None:
                recent[pid or 0] = (key, now)
                if len(recent) > 4096:
                    for p in [p for p, (_, t) in recent.items() if now - t > RECENT_PIDS]:
                        del recent[p]
            if key is None:
                node, targets = "?", list(dirs)
            elif key in nodes:
                node, d = nodes[key]
                targets = [d]
            else:
                node, targets = "host", list(dirs)
            line = format_syslog(data, node)
            for d in targets:
                with contextlib.suppress(OSError), open(d / "logs" / "syslog.log", "a") as f:
                    f.write(line)
        except Exception as e:  # a listener that dies loses everything after: keep going
            print(f"syslogd: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


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
                   help=f"state dir (default $CALLERID_LAB_DIR, else {DEFAULT_DIR} for the "
                        f"lab {DEFAULT_NAME}, /run/NAME for others)")
    p.add_argument("--name", default=None,
                   help=f"lab instance name (default {DEFAULT_NAME}, or the one in --dir)")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab (rebuilds one already up in --dir)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--venv", default=None, help="venv holding node-agent (default <repo>/.venv)")
    up.add_argument("--no-agents", action="store_true")
    up.add_argument("--no-sshd", action="store_true")
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
    pam = sub.add_parser("pam", help="set pam_adopt's options in a node's lab-sshd-NODE")
    pam.add_argument("node")
    pam.add_argument("options", nargs="*", metavar="KEY=VALUE")
    bh = sub.add_parser("blackhole", help="drop (on) or stop dropping (off) TCP to a port")
    bh.add_argument("node")
    bh.add_argument("action", choices=["on", "off"])
    bh.add_argument("--port", type=int, default=AGENT_PORT)
    sub.add_parser("syslog", help="print what the lab's /dev/log listener got")
    args = p.parse_args(argv)
    if tail is not None:
        if args.command != "exec":
            p.error("'--' only separates the command of exec")
        args.argv = list(args.argv) + tail
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_syslogd"]:  # internal: the /dev/log listener started by up
        return syslogd(int(argv[1]))
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="lab: %(message)s", stream=sys.stderr)
    try:
        if args.command == "up":
            Lab(args.dir, args.nodes, args.venv, name=args.name or DEFAULT_NAME).up(
                agents=not args.no_agents, sshd=not args.no_sshd)
            return 0
        lab = Lab.load(args.dir, args.name)
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
        elif args.command == "pam":
            lab.set_pam(args.node, args.options)
        elif args.command == "blackhole":
            lab.blackhole(args.node, args.port, args.action == "on")
        elif args.command == "syslog":
            sys.stdout.write(lab.syslog())
        return 0
    except (LabError, ValueError, KeyError) as e:
        print(f"lab.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
