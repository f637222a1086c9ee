"""The agent's configuration file (TOML), shared by the agent and its CLIs.

The agent reads `/etc/callerid-adopt/agent.toml` (or `--config FILE`). The CLIs read the
same file for the local socket path, the peers' port and the MUNGE socket; they look for
it in this order: `--config`, `$CALLERID_ADOPT_CONFIG`, `/etc/callerid-adopt/agent.toml`,
and fall back to the built-in defaults when none exists.

A bad file is refused with one message naming the file and the key
(`ConfigError`); unknown keys are errors too, so a typo cannot silently turn a
setting back to its default. deploy/agent.toml.example documents every key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callerid import CgroupConfig
from node_agent import pamcontract

DEFAULT_PATH = "/etc/callerid-adopt/agent.toml"
ENV_VAR = "CALLERID_ADOPT_CONFIG"
# Privileged (only root can bind it: no user can squat it while the agent is down) and
# below glibc's bindresvport range (512-1023), which RPC clients take ports from at random.
DEFAULT_PORT = 411
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_OPEN_TIMEOUT = 60


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


#: Defaults of the configuration keys max_sessions, max_sessions_per_user and
#: session_open_timeout (below). A session costs an sshd (a few MiB),
#: two relay threads and a handful of descriptors: 64 stay far from a node's memory and
#: from the 1024-descriptor soft limit; one user gets a quarter of them.
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_SESSIONS_PER_USER = 16
#: ssh-to-job sends its `open` frame as soon as the stream starts; seconds are plenty.
DEFAULT_OPEN_TIMEOUT = 5.0
#: Defaults of locate_parallel and locate_timeout (below): how many agents the CLIs ask at
#: once when they look for a job over `nodes`, and each call's deadline. An agent answers
#: ListJobs in milliseconds; the deadline is what a dead or black-holed node costs.
DEFAULT_LOCATE_PARALLEL = 32
DEFAULT_LOCATE_TIMEOUT = 2.0
MAX_LOCATE_PARALLEL = 256
MAX_LOCATE_TIMEOUT = 60
#: At most this many names in `nodes` (a typo such as node[1-1000000] is refused, not
#: expanded).
MAX_NODES = 65536
# What a folded node set may hold once parsed: host name characters, brackets, ranges and
# commas. ClusterShell reads `@group` as a group (not resolved here: no group source is
# consulted) and would take a blank or '@' into a node name.
_NODESET_TEXT = re.compile(r"[A-Za-z0-9._\-\[\],]*")


@dataclass(frozen=True)
class MungeConfig:
    """Where munged's socket and libmunge are."""
    socket: str = "/run/munge/munge.socket.2"
    library: str = "libmunge.so.2"


BACKENDS = ("native", "slurm")


@dataclass(frozen=True)
class SlurmConfig:
    """Where the Slurm backend finds Slurm's facts, where they differ from Slurm's own."""
    # slurm.conf (its directory's cgroup.conf is read too).
    slurm_conf: str = "/etc/slurm/slurm.conf"
    # SlurmdSpoolDir, when it is not what slurm.conf says for this node ("" = slurm.conf's).
    spool_dir: str = ""
    # This node's Slurm NodeName ("" = as slurmd picks it: by host name).
    nodename: str = ""


@dataclass(frozen=True)
class AgentConfig:
    """The agent's configuration (agent.toml); the CLIs read it too."""
    node_name: str = field(default_factory=socket.gethostname)
    # TCP addresses the gRPC service listens on ("10.0.0.1:411", "[fd00::1]:411").
    listen: tuple[str, ...] = ()
    # The local gRPC socket (CLIs on this node use it).
    socket: str = "/run/callerid-adopt/agent.sock"
    # Root-only socket where pam_adopt.py asks whether to admit (and adopt) a login
    # (the module's default socket=: node_agent/pamcontract.py).
    admission_socket: str = pamcontract.DEFAULT_SOCKET
    # Where ssh-to-job sessions get their private directories.
    session_dir: str = "/run/callerid-adopt/sessions"
    # The port other nodes' agents listen on (caller-ID questions go to <source ip>:port).
    port: int = DEFAULT_PORT
    state_dir: str = "/var/lib/callerid-adopt"
    # Besides root, these uids may learn about any job and manage the native registry.
    admin_uids: tuple[int, ...] = ()
    log_level: str = "info"
    # Prometheus metrics endpoint ("host:port"); "" disables it.
    metrics_listen: str = ""
    procfs: str = "/proc"
    # Use netlink sock_diag for caller-ID lookups (else the /proc/net/tcp scan).
    use_netlink: bool = True
    # Deadline of every call to another agent, in seconds.
    rpc_timeout: float = 2.0
    # gRPC worker threads for every method but ssh-to-job's OpenJobShell, whose streams
    # have max_sessions (+ a few) threads of their own and never take these.
    max_workers: int = 64
    # ssh-to-job sessions on this node, in total and per uid (root and admin_uids are held
    # only to the total). A stream counts from its start, before its `open` frame. The
    # per-uid default is lowered to max_sessions when that is smaller.
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER
    # Seconds a new ssh-to-job stream may take to send its `open` frame.
    session_open_timeout: float = DEFAULT_OPEN_TIMEOUT
    # PAM services whose logins pam_adopt handles: when libpam opens
    # /etc/pam.d/<service> (a login starting), the agent pre-pays the kernel's
    # cgroup-migration toll (node_agent/agent/warmup.py). [] turns that off.
    login_services: tuple[str, ...] = ("sshd",)
    # Where jobs come from: "native" (the agent's registry, fed by adoptctl) or "slurm"
    # (Slurm's own jobs on this node; see [slurm]).
    backend: str = "native"
    # The cluster's nodes whose agents the CLIs ask when they look for a job of the native
    # registry (ssh-to-job JOB, adoptctl jobs --all), in the HPC hostlist syntax parsed
    # with ClusterShell's NodeSet: "node[001-512],gpu[01-08]". Kept folded; node_names()
    # expands it. "" = ask only this node's agent.
    nodes: str = ""
    # Agents asked at once by that search, and each call's deadline in seconds.
    locate_parallel: int = DEFAULT_LOCATE_PARALLEL
    locate_timeout: float = DEFAULT_LOCATE_TIMEOUT
    munge: MungeConfig = field(default_factory=MungeConfig)
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # Where the file came from ("" for built-in defaults), for messages.
    path: str = ""

    def node_names(self) -> list[str]:
        """The names in `nodes`, in NodeSet order (sorted by name, then by index)."""
        return expand_nodes(self.nodes) if self.nodes else []


def parse_nodes(text: str, where: str = "nodes") -> str:
    """Check a node set in the hostlist syntax; its folded form (ConfigError when bad).

    >>> parse_nodes("node[001-003],gpu01, node004")
    'gpu01,node[001-004]'
    """
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetException

    if not text.strip():
        raise ConfigError(f"{where}: expected a node set such as \"node[001-512]\", "
                          f"got {text!r}")
    try:
        nodeset = NodeSet(text, resolver=RESOLVER_NOGROUP)
    except NodeSetException as e:
        raise ConfigError(f"{where}: not a node set ({e}): {text!r}") from None
    if len(nodeset) > MAX_NODES:
        raise ConfigError(f"{where}: {len(nodeset)} nodes, more than {MAX_NODES}: {text!r}")
    folded = str(nodeset)
    if not folded or _NODESET_TEXT.fullmatch(folded) is None:
        raise ConfigError(f"{where}: expected host names and ranges (node[001-512],gpu01), "
                          f"got {text!r}")
    return folded


def expand_nodes(folded: str) -> list[str]:
    """The node names of a set checked by parse_nodes."""
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet

    return list(NodeSet(folded, resolver=RESOLVER_NOGROUP))


def fold_nodes(names: list[str]) -> str:
    """Node names -> the short hostlist form for messages: node1,node2,node5 -> node[1-2,5]."""
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetException

    try:
        return str(NodeSet.fromlist(names, resolver=RESOLVER_NOGROUP))
    except (ValueError, TypeError, NodeSetException):  # e.g. an IPv6 address: list them
        return ",".join(names)


def _expect(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML booleans are Python bools, and bool is a subclass of int: `port = true`
    # must not pass as port 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return value


def _str_list(where: str, value: Any) -> tuple[str, ...]:
    _expect(where, value, list, "a list of strings")
    for item in value:
        _expect(where, item, str, "a list of strings")
    return tuple(value)


def _check_hostport(where: str, text: str) -> None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT (IPv6 as [addr]:port), got {text!r}")


def _check_session_limits(path: str, kw: dict[str, Any]) -> None:
    total = kw.get("max_sessions", DEFAULT_MAX_SESSIONS)
    if "max_sessions_per_user" not in kw:  # a smaller total lowers the default share
        kw["max_sessions_per_user"] = min(DEFAULT_MAX_SESSIONS_PER_USER, max(total, 1))
    per_user = kw["max_sessions_per_user"]
    if total < 1:
        raise ConfigError(f"{path}: max_sessions: expected at least 1")
    if per_user < 1:
        raise ConfigError(f"{path}: max_sessions_per_user: expected at least 1")
    if per_user > total:
        raise ConfigError(f"{path}: max_sessions_per_user: {per_user} is more than "
                          f"max_sessions ({total})")
    timeout = kw.get("session_open_timeout", DEFAULT_OPEN_TIMEOUT)
    # The deadline is what frees the slot of a stream that sends nothing: a long one would
    # let idle streams hold a user's share for that long.
    if not 0 < timeout <= MAX_OPEN_TIMEOUT:
        raise ConfigError(f"{path}: session_open_timeout: expected more than 0 and at most "
                          f"{MAX_OPEN_TIMEOUT} seconds")


def parse(data: dict[str, Any], path: str = "<config>") -> AgentConfig:
    """Build an AgentConfig from parsed TOML, checking every key and type."""
    data = dict(data)
    kw: dict[str, Any] = {"path": path}
    munge = data.pop("munge", {})
    cgroup = data.pop("cgroup", {})
    slurm = data.pop("slurm", {})
    simple: dict[str, tuple[type | tuple[type, ...], str]] = {
        "node_name": (str, "a string"),
        "socket": (str, "a path"),
        "admission_socket": (str, "a path"),
        "session_dir": (str, "a path"),
        "port": (int, "a port number"),
        "state_dir": (str, "a path"),
        "log_level": (str, "one of " + ", ".join(LOG_LEVELS)),
        "metrics_listen": (str, "HOST:PORT or an empty string"),
        "procfs": (str, "a path"),
        "use_netlink": (bool, "true or false"),
        "rpc_timeout": ((int, float), "a number of seconds"),
        "max_workers": (int, "a number of threads"),
        "max_sessions": (int, "a number of sessions"),
        "max_sessions_per_user": (int, "a number of sessions"),
        "session_open_timeout": ((int, float), "a number of seconds"),
        "backend": (str, "one of " + ", ".join(BACKENDS)),
        "locate_parallel": (int, "a number of calls"),
        "locate_timeout": ((int, float), "a number of seconds"),
    }
    for key, value in data.items():
        where = f"{path}: {key}"
        if key == "listen":
            kw["listen"] = _str_list(where, value)
            for item in kw["listen"]:
                _check_hostport(where, item)
        elif key == "login_services":
            kw["login_services"] = _str_list(where, value)
            for name in kw["login_services"]:
                if not name or "/" in name:
                    raise ConfigError(f"{where}: expected PAM service names, got {name!r}")
        elif key == "admin_uids":
            _expect(where, value, list, "a list of uids")
            for uid in value:
                _expect(where, uid, int, "a list of uids")
            kw["admin_uids"] = tuple(value)
        elif key == "nodes":
            kw["nodes"] = parse_nodes(_expect(where, value, str, 'a node set ("node[1-9]")'),
                                      where)
        elif key in simple:
            kind, what = simple[key]
            kw[key] = _expect(where, value, kind, what)
        else:
            raise ConfigError(f"{where}: unknown setting")
    if kw.get("backend", "native") not in BACKENDS:
        raise ConfigError(f"{path}: backend: expected one of {', '.join(BACKENDS)}")
    if kw.get("log_level", "info") not in LOG_LEVELS:
        raise ConfigError(f"{path}: log_level: expected one of {', '.join(LOG_LEVELS)}")
    if not 0 < kw.get("port", DEFAULT_PORT) < 65536:
        raise ConfigError(f"{path}: port: expected 1..65535")
    if kw.get("rpc_timeout", 1.0) <= 0:
        raise ConfigError(f"{path}: rpc_timeout: expected a positive number of seconds")
    if kw.get("max_workers", 1) < 1:
        raise ConfigError(f"{path}: max_workers: expected at least 1")
    _check_session_limits(path, kw)
    if not 1 <= kw.get("locate_parallel", 1) <= MAX_LOCATE_PARALLEL:
        raise ConfigError(f"{path}: locate_parallel: expected 1..{MAX_LOCATE_PARALLEL}")
    if not 0 < kw.get("locate_timeout", 1.0) <= MAX_LOCATE_TIMEOUT:
        raise ConfigError(f"{path}: locate_timeout: expected more than 0 and at most "
                          f"{MAX_LOCATE_TIMEOUT} seconds")
    if kw.get("metrics_listen"):
        _check_hostport(f"{path}: metrics_listen", kw["metrics_listen"])

    _expect(f"{path}: [munge]", munge, dict, "a table")
    mkw: dict[str, Any] = {}
    for key, value in munge.items():
        if key not in ("socket", "library"):
            raise ConfigError(f"{path}: munge.{key}: unknown setting")
        mkw[key] = _expect(f"{path}: munge.{key}", value, str, "a string")
    kw["munge"] = MungeConfig(**mkw)

    _expect(f"{path}: [cgroup]", cgroup, dict, "a table")
    ckw: dict[str, Any] = {}
    for key, value in cgroup.items():
        where = f"{path}: cgroup.{key}"
        if key in ("v1", "v2_controllers"):
            ckw[key] = _str_list(where, value)
        elif key == "v2":
            ckw[key] = _expect(where, value, bool, "true or false")
        elif key in ("mount_root", "subtree"):
            ckw[key] = _expect(where, value, str, "a string")
        else:
            raise ConfigError(f"{where}: unknown setting")
    subtree = ckw.get("subtree", "callerid")
    if not subtree or subtree.startswith("/") or ".." in subtree.split("/"):
        raise ConfigError(f"{path}: cgroup.subtree: expected a relative path without '..'")
    kw["cgroup"] = CgroupConfig(**ckw)

    _expect(f"{path}: [slurm]", slurm, dict, "a table")
    skw: dict[str, Any] = {}
    for key, value in slurm.items():
        if key not in ("slurm_conf", "spool_dir", "nodename"):
            raise ConfigError(f"{path}: slurm.{key}: unknown setting")
        skw[key] = _expect(f"{path}: slurm.{key}", value, str, "a string")
    kw["slurm"] = SlurmConfig(**skw)
    return AgentConfig(**kw)


def load(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and check one configuration file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except PermissionError:
        raise ConfigError(f"{p}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse(data, str(p))


def find(explicit: str | None = None, required: bool = False) -> AgentConfig:
    """The CLIs' search order: explicit path, $CALLERID_ADOPT_CONFIG, /etc, defaults."""
    if explicit:
        return load(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return load(env)
    if Path(DEFAULT_PATH).exists() or required:
        return load(DEFAULT_PATH)
    return AgentConfig()
