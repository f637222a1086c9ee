"""Lab instances: their names and state dirs, the owner files that say which dir a name is
up in, the machine lock, the record of what instances share, which instances are up, and
``Instance``, the base of the Lab class (identity, node names, the ``lab.json`` state file,
taking and checking the name).

Several labs can be up at once, each under its own name; see README.md, "Instances".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LabError
from .host import REPO, read_json, require_root, write_file

if TYPE_CHECKING:
    from .cgroups import Hierarchy
    from .daemons import DaemonKind

log = logging.getLogger("lab")

DEFAULT_NAME = "cidlab"
DEFAULT_DIR = Path("/run/callerid-lab")
#: Owner file of the lab named DEFAULT_NAME; other names: owner_file(name).
OWNER_FILE = Path("/run/callerid-lab.owner")
#: flock'ed around every change to machine-wide state (owner files, shared things).
LOCK_FILE = Path("/run/callerid-lab.lock")
#: What labs created outside their dirs, shared by every instance up (see README.md).
SHARED_FILE = Path("/run/callerid-lab.shared.json")
NAME_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
MAX_NAME = 24
MAX_NODES = 200
#: The head "node": the namespace with the bridge, where munged and the syslog listener run.
HEAD = "head"


def check_name(name: str) -> str:
    """``name`` if it can name a lab (it prefixes netns, cgroup and nftables names)."""
    if not (NAME_RE.fullmatch(name) and len(name) <= MAX_NAME):
        raise ValueError(f"lab name {name!r}: want lower-case letters, digits and single "
                         f"inner '-', starting with a letter, at most {MAX_NAME} characters")
    return name


def owner_file(name: str = DEFAULT_NAME) -> Path:
    """The file that names the state dir of the lab called ``name`` while it is up."""
    return OWNER_FILE if name == DEFAULT_NAME else Path(f"/run/callerid-lab.{name}.owner")


def default_dir(name: str = DEFAULT_NAME) -> Path:
    """``$CALLERID_LAB_DIR``, else /run/callerid-lab for DEFAULT_NAME and /run/NAME."""
    env = os.environ.get("CALLERID_LAB_DIR")
    if env:
        return Path(env)
    return DEFAULT_DIR if name == DEFAULT_NAME else Path("/run") / name


def read_owner(name: str = DEFAULT_NAME) -> dict[str, Any] | None:
    """The owner file of lab ``name``: {"dir": its state dir, "name": name}."""
    return read_json(owner_file(name))


def instances() -> dict[str, Path]:
    """Every lab instance with an owner file on this machine: name -> state dir."""
    out: dict[str, Path] = {}
    files = [OWNER_FILE, *sorted(Path("/run").glob("callerid-lab.*.owner"))]
    for f in files:
        data = read_json(f)
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


def load_shared() -> dict[str, Any]:
    """SHARED_FILE: what labs created on the machine, shared by every instance up."""
    return read_json(SHARED_FILE) or {}


def save_shared(data: Mapping[str, Any]) -> None:
    write_file(SHARED_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


class Instance:
    """One lab instance: its name, state dir, nodes and venv, and its ``lab.json``.

    The base of ``Lab``: every attribute the other parts of the class use is set here.
    """

    def __init__(
        self,
        dir: str | Path | None = None,
        nodes: int = 2,
        venv: str | Path | None = None,
        agents: bool = True,
        *,
        name: str = DEFAULT_NAME,
        sshd: bool = True,
        slurm: bool = False,
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
        self.slurm = slurm  # likewise
        self._hier: list[Hierarchy] | None = None
        self._children: dict[int, subprocess.Popen[Any]] = {}  # daemons we started, to reap
        self._daemons: list[DaemonKind[Any]] | None = None  # see Lab.daemons

    def __repr__(self) -> str:
        return f"Lab({str(self.dir)!r}, nodes={len(self.nodes)}, name={self.name!r})"

    def index(self, node: str) -> int:
        """i of ``nodeI``; LabError for a node this lab does not have."""
        if node not in self.nodes:
            raise LabError(f"unknown node {node!r}; this lab has {', '.join(self.nodes)}")
        return int(node[4:])

    def venv_bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    @property
    def owner_file(self) -> Path:
        return owner_file(self.name)

    @staticmethod
    def _require_root() -> None:
        require_root()

    # ----------------------------------------------------------- lab.json

    def _state_path(self) -> Path:
        return self.dir / "lab.json"

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_path().read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, state: Mapping[str, Any]) -> None:
        write_file(self._state_path(), json.dumps(state, indent=2, sort_keys=True) + "\n")

    def is_up(self) -> bool:
        return self._load_state().get("state") == "up"

    def _require_state(self) -> dict[str, Any]:
        """lab.json of a lab that is up or coming up; LabError otherwise."""
        state = self._load_state()
        if state.get("state") not in ("starting", "up"):
            raise LabError(f"no lab is up at {self.dir}")
        return state

    # ------------------------------------------------------------ the name

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
        owner = read_owner(self.name)
        if owner is not None:
            other = Path(owner.get("dir") or "/nonexistent")
            if other != self.dir and (other / "lab.json").exists():
                raise LabError(
                    f"another lab named {self.name!r} is up at {other}; run "
                    f"`lab.py --name {self.name} --dir {other} down` first")
            return other
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._save_state(state)
        write_file(self.owner_file, json.dumps({"dir": str(self.dir), "name": self.name}) + "\n")
        return None

    def _owns_name(self) -> bool:
        """False if another live lab of this name (in another dir) owns the name."""
        owner = read_owner(self.name)
        if owner is None:
            return True  # nobody claims it: leftovers, if any, are stale
        other = Path(owner.get("dir") or "/nonexistent")
        if other == self.dir or not (other / "lab.json").exists():
            return True
        log.warning("lab %s belongs to %s: only cleaning %s", self.name, other, self.dir)
        return False
