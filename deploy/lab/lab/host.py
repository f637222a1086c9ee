"""Host helpers: the tools the lab runs and where they are, running one on the host, pids
and pid files, files written atomically, JSON, the mount table, and the listening sockets
of another network namespace.

Nothing here knows about lab instances, nodes or daemons: every other module of the
package builds on these. Standard library only, like the whole package.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LabError

#: deploy/lab/lab: this package.
PACKAGE_DIR = Path(__file__).resolve().parent
#: deploy/lab: the package, its entry point lab.py, demo.py, pam_noop.py and progs/.
LAB_DIR = PACKAGE_DIR.parent
#: The checkout the lab runs (its venv, pam/, callerid/, node_agent/).
REPO = LAB_DIR.parents[1]
#: ``python3 deploy/lab/lab.py``: the CLI; also how the /dev/log listener is started.
ENTRY_POINT = LAB_DIR / "lab.py"
#: The PATH of everything the lab runs, on the host and in the nodes.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
PAM_PYTHON_CANDIDATES = ("/usr/lib/security/pam_python.so", "/lib/security/pam_python.so",
                         "/usr/lib/x86_64-linux-gnu/security/pam_python.so",
                         "/lib/x86_64-linux-gnu/security/pam_python.so")


def tool(name: str) -> str:
    """The absolute path of a tool on PATH; the bare name if it is missing (``up`` then
    says which tools are missing, since a missing one is the only relative path)."""
    return shutil.which(name, path=PATH) or name


SH = "/bin/sh"
NSENTER = tool("nsenter")
UNSHARE = tool("unshare")
SETPRIV = tool("setpriv")
ENV = tool("env")
IP = tool("ip")
MOUNT = tool("mount")
UMOUNT = tool("umount")
MUNGED = tool("munged")
MUNGEKEY = tool("mungekey")
USERADD = tool("useradd")
SSHD = tool("sshd")
SSH = tool("ssh")
SSH_KEYGEN = tool("ssh-keygen")
NFT = tool("nft")
TASKSET = tool("taskset")


def on_one_cpu() -> list[str]:
    """``taskset -c CPU``: the command after it runs on one CPU (the lowest this process
    may use). Why the lab needs it: see slurm.py, SlurmMixin."""
    return [TASKSET, "-c", str(min(os.sched_getaffinity(0)))]


def pam_python() -> str:
    """Where libpam-python's module is (PAM files need its absolute path)."""
    for p in PAM_PYTHON_CANDIDATES:
        if os.path.exists(p):
            return p
    return PAM_PYTHON_CANDIDATES[0]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, cgroups, mounts)")


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename): readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def run_host(
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


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return st[st.rindex(")") + 2] not in "ZX"


def read_pid(path: Path) -> int | None:
    """The pid in a pid file; None if the file is missing or holds no number."""
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from path; None if the file is missing. A file that is not JSON is
    read as ``{"dir": <its text>}``: the owner files of older labs held only the dir."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"dir": text.strip()}


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount point, fstype, source, super options) of this process's mounts, in order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source, sopts = (right.split() + ["", "", ""])[:3]
        out.append((_unescape(fields[4]), fstype, source, sopts))
    return out


def is_mount(path: str | Path) -> bool:
    """True if something is mounted at path (os.path.ismount misses same-fs bind mounts)."""
    p = os.path.realpath(path)
    return any(m[0] == p for m in mountinfo())


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return path.encode().decode("unicode_escape") if "\\" in path else path


def proc_net_addr(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} shows it (each 32-bit word in host byte order)."""
    packed = ipaddress.ip_address(ip).packed
    words = [packed[i:i + 4] for i in range(0, len(packed), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return "".join(w.hex().upper() for w in words) + f":{port:04X}"


def listening(pid: int, addrs: Sequence[tuple[str, int]]) -> bool:
    """True if every (ip, port) is in LISTEN in the network namespace of pid."""
    want = {proc_net_addr(ip, port) for ip, port in addrs}
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


def ns_key(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a namespace file: equal keys, same namespace."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
