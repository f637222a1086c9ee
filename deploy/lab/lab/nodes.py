"""The nodes: each one a network + UTS + mount + cgroup namespace. Making them (hostname,
the node's own view of the lab cgroups, bind mounts, no references to other nodes), their
dirs in the state dir, and running commands inside one (``cmd``, ``run``, ``popen``).

Entering a node is a pure argv (``Lab.cmd``); ``ip netns exec`` is never used (it remounts
/sys, and /sys/fs/cgroup is empty inside it). See README.md, "Layout".
"""

from __future__ import annotations

import pwd
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cgroups import CgroupsMixin
from .errors import LabCommandError
from .host import (
    ENV,
    MOUNT,
    NSENTER,
    PATH,
    SETPRIV,
    SH,
    UMOUNT,
    UNSHARE,
    on_one_cpu,
    run_host,
    write_file,
)
from .network import NETNS_DIR, NetworkMixin

if TYPE_CHECKING:
    from .daemons import DaemonKind

#: The namespaces of a node persisted as nsfs bind mounts in <dir>/ns/<node>/.
NS_KINDS = ("uts", "mnt", "cgroup")


class NodesMixin(CgroupsMixin, NetworkMixin):
    """Make the nodes and run commands in them."""

    def ns_file(self, node: str, kind: str) -> Path:
        return self.dir / "ns" / node / kind

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

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
        inner += [f"{k}={v}" for k, v in _environment(pw, env).items()]
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

    # -------------------------------------------------------------- making

    def _make_node_dirs(self) -> None:
        """The hosts file and, per node, its dir and the files its namespaces are bound to."""
        write_file(self.dir / "hosts", self._hosts_text())
        for node in self.nodes:
            self.node_dir(node).mkdir(mode=0o755, parents=True, exist_ok=True)
            (self.dir / "ns" / node).mkdir(exist_ok=True)
            for kind in NS_KINDS:
                self.ns_file(node, kind).touch()

    def _mount_points(self, node: str, kinds: Sequence[DaemonKind[Any]]) -> list[tuple[Path, Path]]:
        """(source on the host, target inside the node) of the node's bind mounts."""
        out = [(self.dir / "hosts", Path("/etc/hosts"))]
        for kind in kinds:
            out += kind.mounts(node)
        return out

    def _node_script(self, node: str, kinds: Sequence[DaemonKind[Any]]) -> str:
        """What runs inside the node's new namespaces to set them up."""
        script = ["set -e", f"echo {node} >/proc/sys/kernel/hostname"]
        for h in self.hierarchies:
            mp = shlex.quote(str(h.mountpoint))
            script.append(f"{UMOUNT} {mp}")
            if h.fstype == "cgroup":
                script.append(f"{MOUNT} -t cgroup -o {shlex.quote(h.options)} cgroup {mp}")
            else:
                script.append(f"{MOUNT} -t cgroup2 cgroup2 {mp}")
        for src, target in self._mount_points(node, kinds):
            script.append(f"{MOUNT} --bind {shlex.quote(str(src))} {shlex.quote(str(target))}")
        script += self._detach_ns_lines()
        return "\n".join(script)

    def _detach_ns_lines(self) -> list[str]:
        """Shell lines that, run in a new mount namespace, drop its references to other
        nodes' namespaces (this lab's or another instance's): DIR/ns, /run/netns, nsfs."""
        return [
            f"{UMOUNT} -l {shlex.quote(str(self.dir / 'ns'))}",
            f"if mountpoint -q {NETNS_DIR}; then {UMOUNT} -l {NETNS_DIR}; fi",
            r"for m in $(sed -n 's/^[^ ]* [^ ]* [^ ]* [^ ]* \([^ ]*\) .* - nsfs .*/\1/p'"
            f" /proc/self/mountinfo | sort -r); do {UMOUNT} -l \"$m\" 2>/dev/null || :; done",
        ]

    def _make_nodes(self, kinds: Sequence[DaemonKind[Any]]) -> None:
        """unshare each node's UTS, mount and cgroup namespaces from inside its cgroups
        (so its cgroup namespace is rooted at <name>/<node>) and persist them."""
        for node in self.nodes:
            argv = [
                SH, "-c", self._move_self(node) + ' && exec "$@"',
                f"lab-{node}", UNSHARE,
                f"--uts={self.ns_file(node, 'uts')}",
                f"--mount={self.ns_file(node, 'mnt')}",
                f"--cgroup={self.ns_file(node, 'cgroup')}",
                "--propagation", "private", "--", SH, "-c", self._node_script(node, kinds),
            ]
            # With Slurm's job_container/tmpfs, the node's mount namespace is made on the CPU
            # slurmd runs on (see slurm.py, SlurmMixin).
            run_host([*on_one_cpu(), *argv] if getattr(self, "slurm_job_container", False)
                     else argv)


def _environment(pw: pwd.struct_passwd, env: Mapping[str, str] | None) -> dict[str, str]:
    """The clean environment of a command in a node: the user's, PATH, plus ``env``."""
    variables = {
        "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh", "PATH": PATH,
    }
    for k, v in (env or {}).items():
        if not k or "=" in k or "\0" in k + v:
            raise ValueError(f"bad environment variable name or value: {k!r}")
        variables[k] = v
    return variables
