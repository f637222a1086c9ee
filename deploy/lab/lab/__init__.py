"""lab: the callerid-adopt multi-node lab, N "nodes" on one Linux machine built from
namespaces, on which the demo, the integration tests and the benchmarks run.

Root only, standard library only. ``import lab`` (with deploy/lab on sys.path: pytest's
``pythonpath``, the dev venv's .pth, or running a script in deploy/lab) gives the API
below; ``python3 deploy/lab/lab.py --help`` the CLI. README.md (next to this package)
describes the layout, the rules the lab keeps, and how to run it.

The package, one concern per module, each building on those above it::

    errors      LabError, LabCommandError
    host        the tools and where they are, running one on the host, pids, files, mounts
    instances   names, state dirs, owner files, the machine lock, what instances share;
                Instance, the base of Lab (identity, lab.json, taking the name)
    cgroups     the lab's cgroup subtree (never memory): make, enter, empty, remove
    network     netns, bridge, veth, addresses, the nodes' /etc/hosts, black holes
    nodes       a node's namespaces and bind mounts; cmd/run/popen inside a node
    daemons     DaemonKind (the seam for one more kind of daemon) and process handling
    munge       munged (a daemon kind)
    agent       the node agent: config, start, wait for READY=1 (a daemon kind)
    sshd        three sshd per node, their PAM stacks (pam_adopt or pam_slurm_adopt on
                port 22), keys, ssh between nodes (a kind)
    slurm       real Slurm: slurmctld on the head, slurmd per node (a kind; up(slurm=True))
    syslog      the /dev/log listener and who owns it
    teardown    down
    core        Lab: the mixins above put together, its DAEMON_KINDS, up, status
    cli         the command line (lab.py)

Adding a kind of daemon (a broker, ...) is one module with a
``daemons.DaemonKind`` subclass, listed in ``Lab.DAEMON_KINDS``.
"""

from __future__ import annotations

from .agent import AGENT_READY_TIMEOUT, AGENT_V1
from .cgroups import CGROUP_ROOT, HIERARCHIES, Hierarchy, discover_hierarchies, pid_in_lab
from .cli import main
from .core import LAB_USER_GECOS, LAB_USERS, Lab
from .daemons import STOP_TIMEOUT, DaemonKind
from .errors import LabCommandError, LabError
from .host import (
    ENV,
    IP,
    LAB_DIR,
    MOUNT,
    MUNGED,
    MUNGEKEY,
    NFT,
    NSENTER,
    PAM_PYTHON_CANDIDATES,
    PATH,
    REPO,
    SETPRIV,
    SH,
    SSH,
    SSH_KEYGEN,
    SSHD,
    SYSTEM_PYTHON,
    UMOUNT,
    UNSHARE,
    USERADD,
    pid_alive,
    read_pid,
)
from .instances import (
    DEFAULT_DIR,
    DEFAULT_NAME,
    HEAD,
    LOCK_FILE,
    MAX_NAME,
    MAX_NODES,
    NAME_RE,
    OWNER_FILE,
    SHARED_FILE,
    check_name,
    default_dir,
    instances,
    live_instances,
    machine_lock,
    owner_file,
)
from .munge import MUNGE_TIMEOUT
from .network import AGENT_PORT, BRIDGE, METRICS_PORT, NET_TIMEOUT, NETNS_DIR
from .slurm import SLURM_ETC, SLURM_TIMEOUT
from .sshd import (
    PAM_ADOPT,
    PAM_MODULES,
    PAM_NOOP,
    PAM_SLURM_ADOPT,
    PRIVSEP_DIR,
    SSH_USERS,
    SSHD_TIMEOUT,
    SSHD_VARIANTS,
)
from .syslog import (
    CLONE_NEWNET,
    DEV_LOG,
    DEVLOG_QUEUE,
    FACILITIES,
    RECENT_PIDS,
    SEVERITIES,
    format_syslog,
    syslogd,
)

# The names these helpers had when the lab was one module; tests still use them.
_pid_alive = pid_alive
_pid_in_lab = pid_in_lab
_read_pid = read_pid

__all__ = [
    "AGENT_PORT", "AGENT_READY_TIMEOUT", "AGENT_V1", "BRIDGE", "CGROUP_ROOT", "CLONE_NEWNET",
    "DEFAULT_DIR", "DEFAULT_NAME", "DEVLOG_QUEUE", "DEV_LOG", "ENV", "FACILITIES", "HEAD",
    "HIERARCHIES", "IP", "LAB_DIR", "LAB_USERS", "LAB_USER_GECOS", "LOCK_FILE", "MAX_NAME",
    "MAX_NODES", "METRICS_PORT", "MOUNT", "MUNGED", "MUNGEKEY", "MUNGE_TIMEOUT", "NAME_RE",
    "NETNS_DIR", "NET_TIMEOUT", "NFT", "NSENTER", "OWNER_FILE", "PAM_ADOPT", "PAM_NOOP",
    "PAM_MODULES", "PAM_SLURM_ADOPT", "SLURM_ETC", "SLURM_TIMEOUT",
    "PAM_PYTHON_CANDIDATES", "PATH", "PRIVSEP_DIR", "RECENT_PIDS", "REPO", "SETPRIV",
    "SEVERITIES", "SH", "SHARED_FILE", "SSH", "SSHD", "SSHD_TIMEOUT", "SSHD_VARIANTS",
    "SSH_KEYGEN", "SSH_USERS", "STOP_TIMEOUT", "SYSTEM_PYTHON", "UMOUNT", "UNSHARE", "USERADD",
    "DaemonKind", "Hierarchy", "Lab", "LabCommandError", "LabError", "check_name",
    "default_dir", "discover_hierarchies", "format_syslog", "instances", "live_instances",
    "machine_lock", "main", "owner_file", "pid_alive", "pid_in_lab", "read_pid", "syslogd",
]
