"""sshd and PAM in the lab: three sshd per node (port 22 with pam_adopt, 2201 without it,
2202 with the no-op pam_python module), their configs and PAM stacks, host and client
keys, known_hosts and the ssh client config the nodes see, and ``ssh_argv`` to log in
from node to node. ``Sshd`` is the daemon kind; ``SshdMixin`` the Lab's methods.

The host's /etc/pam.d, /etc/ssh, home dirs and /root are never written: the nodes see
copies bound over them (root's home: an empty directory of the lab's). See README.md, "ssh".
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .daemons import DaemonKind, ProcessesMixin, Steps
from .errors import LabError
from .host import (
    ENV,
    LAB_DIR,
    PATH,
    REPO,
    SSH,
    SSH_KEYGEN,
    SSHD,
    listening,
    pam_python,
    tail,
    write_file,
)
from .nodes import NodesMixin

SSH_USERS = ("alice", "bob", "root")
SSHD_TIMEOUT = 10.0
#: sshd variants: name -> (port, suffix of the PAM service name).
SSHD_VARIANTS = {"adopt": (22, ""), "none": (2201, "-none"), "noop": (2202, "-noop")}
#: sshd's privilege separation dir, made on the host if missing (shared by instances).
PRIVSEP_DIR = Path("/run/sshd")
PAM_ADOPT = REPO / "pam" / "pam_adopt.py"
PAM_NOOP = LAB_DIR / "pam_noop.py"
#: Debian's libpam-slurm-adopt (an absolute path: the lab's PAM files name modules so).
PAM_SLURM_ADOPT = Path("/lib/security/pam_slurm_adopt.so")
#: What the account stack of the port-22 sshd can end with (``set_pam_module``).
PAM_MODULES = ("adopt", "slurm")


def pam_service_name(node: str, variant: str = "adopt") -> str:
    """``lab-sshd-<node>[-none|-noop]``: sshd names its PAM service after its argv[0]."""
    if variant not in SSHD_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(SSHD_VARIANTS)}: {variant!r}")
    return f"lab-sshd-{node}{SSHD_VARIANTS[variant][1]}"


class SshdMixin(NodesMixin, ProcessesMixin):
    """The nodes' sshd, their PAM stacks, and ssh between nodes."""

    def pam_service(self, node: str, variant: str = "adopt") -> str:
        """The PAM service of a node's sshd: ``lab-sshd-<node>[-none|-noop]``."""
        self.index(node)
        return pam_service_name(node, variant)

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

    # --------------------------------------------------- configs and stacks

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

    def pam_stack(self, node: str, variant: str = "adopt", options: Sequence[str] = (),
                  module: str = "adopt") -> str:
        """The PAM file of a node's sshd: Debian's sshd stack without pam_systemd,
        pam_selinux, pam_motd and pam_mail, plus (last in account) pam_adopt, pam_noop or
        nothing. With ``module="slurm"`` the port-22 stack ends with pam_slurm_adopt
        instead of pam_adopt (``service=`` and ``nodename=`` given, as it needs here)."""
        service = self.pam_service(node, variant)
        if module not in PAM_MODULES:
            raise ValueError(f"module must be one of {', '.join(PAM_MODULES)}: {module!r}")
        if module != "adopt" and variant != "adopt":
            raise ValueError(f"only the port-22 sshd (variant adopt) can run {module}")
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
        if variant == "adopt" and module == "slurm":
            # No leading "-": a missing pam_slurm_adopt.so must deny, not let everyone in.
            given = {o.split("=", 1)[0].lower() for o in options}
            extra = [] if "nodename" in given else [f"nodename={node}"]
            lines.append(f"account    required     {PAM_SLURM_ADOPT} "
                         + " ".join([f"service={service}", *extra, *options]))
        elif variant == "adopt":
            lines.append(f"-account   required     {pam_python()} {PAM_ADOPT} "
                         + " ".join([f"service={service}", *options]))
        elif variant == "noop":
            lines.append(f"-account   required     {pam_python()} {PAM_NOOP}")
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
        self.set_pam_module(node, "adopt", options)

    def set_pam_module(self, node: str, module: str = "adopt",
                       options: Sequence[str] = ()) -> None:
        """Rewrite the node's ``lab-sshd-<node>`` PAM file (the port-22 sshd) to end its
        account stack with ``module``: "adopt" (pam_adopt, as ``up`` writes it) or "slurm"
        (pam_slurm_adopt, ``service=lab-sshd-<node> nodename=<node>``, for a lab up with
        Slurm), followed by ``options``. Atomic; PAM reads it at the next login."""
        text = self.pam_stack(node, "adopt", list(options), module)
        pam = self.node_dir(node) / "pam.d"
        if not pam.is_dir():
            raise LabError(f"{pam} does not exist: is the lab up with sshd?")
        if module == "slurm":
            if not PAM_SLURM_ADOPT.exists():
                raise LabError(f"{PAM_SLURM_ADOPT} is missing: run deploy/install-deps.sh")
            if not self._load_state().get("slurm"):
                raise LabError("pam_slurm_adopt needs Slurm in the lab: lab.py up --slurm")
        write_file(pam / self.pam_service(node), text)

    # ------------------------------------------------------ making it all

    def _make_ssh_dirs(self) -> None:
        d = self.dir
        for sub in ("bin", "ssh", "ssh/keys", "ssh/authorized_keys", "ssh/ssh_config.d"):
            (d / sub).mkdir(mode=0o755, exist_ok=True)
            os.chmod(d / sub, 0o755)
        (d / "root-home").mkdir(mode=0o700, exist_ok=True)
        for node in self.nodes:
            (self.node_dir(node) / "ssh").mkdir(mode=0o755, exist_ok=True)
            pam = self.node_dir(node) / "pam.d"
            shutil.copytree("/etc/pam.d", pam, symlinks=True, dirs_exist_ok=True)

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

    def _make_ssh(self, keygen: Sequence[subprocess.Popen[bytes]]) -> None:
        """Keys, known_hosts, client config, sshd configs, PAM files, argv[0] symlinks."""
        for p in keygen:
            _, err = p.communicate(timeout=30)
            if p.returncode != 0:
                raise LabError(f"{p.args!r} failed: {err.decode(errors='replace')}")
        self._install_client_keys()
        self._write_known_hosts()
        self._write_client_config()
        for node in self.nodes:
            self._write_node_sshd_files(node)

    def _install_client_keys(self) -> None:
        for user in SSH_USERS:
            pw = pwd.getpwnam(user)
            key = self.client_key(user)
            os.chown(key, pw.pw_uid, pw.pw_gid)
            os.chmod(key, 0o600)
            os.chmod(key.with_name(user + ".pub"), 0o644)
            write_file(self.dir / "ssh" / "authorized_keys" / user,
                       key.with_name(user + ".pub").read_text())

    def _write_known_hosts(self) -> None:
        """Every node by name, IPv4 and IPv6, on all three ports."""
        known = []
        for node in self.nodes:
            pub = " ".join(self._host_key(node).with_name(
                "ssh_host_ed25519_key.pub").read_text().split()[:2])
            hosts = [node, self.ip(node), self.ip(node, 6)]
            known.append(",".join(hosts) + " " + pub)
            for variant in ("none", "noop"):
                port = self.sshd_port(variant)
                known.append(",".join(f"[{h}]:{port}" for h in hosts) + " " + pub)
        write_file(self.dir / "ssh" / "known_hosts", "\n".join(known) + "\n")

    def _write_client_config(self) -> None:
        d = self.dir
        write_file(d / "ssh" / "ssh_config.d" / "lab.conf", "\n".join([
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

    def _write_node_sshd_files(self, node: str) -> None:
        """The node's PAM files (its copy of /etc/pam.d), sshd configs, argv[0] links."""
        pam = self.node_dir(node) / "pam.d"
        nonint = pam / "common-session-noninteractive"
        if nonint.exists() and "pam_systemd" in nonint.read_text():
            write_file(nonint, "".join(line for line in nonint.read_text().splitlines(True)
                                       if "pam_systemd" not in line))
        for variant in SSHD_VARIANTS:
            write_file(pam / self.pam_service(node, variant), self.pam_stack(node, variant))
            write_file(self._sshd_conf(node, variant), self.sshd_config(node, variant))
            link = self.dir / "bin" / self.pam_service(node, variant)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(os.path.realpath(SSHD))

    # ------------------------------------------------------------ running

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
                if listening(p.pid, [(self.ip(node), port), (self.ip(node, 6), port)]):
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
                               f"{logf}:\n{tail(logf)}")
            if waiting:
                time.sleep(0.005)

    def sshd_pid(self, node: str, variant: str = "adopt") -> int | None:
        """The pid of a node's sshd listener if it runs."""
        return self._live_pid(self._sshd_pidfile(node, variant))

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


class Sshd(DaemonKind[SshdMixin]):
    """The three sshd of every node; part of the lab unless ``up(sshd=False)``.

    Keys are generated in the background from ``prepare`` on; ``start`` writes the
    configs and spawns every sshd, ``wait`` waits until all of them listen.
    """

    name = "sshd"

    def __init__(self, lab: SshdMixin) -> None:
        super().__init__(lab)
        self._keygen: list[subprocess.Popen[bytes]] = []
        self._procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}

    def present(self, state: Mapping[str, Any]) -> bool:
        return bool(state.get("sshd", False))

    def tools(self) -> list[str]:
        return [SSHD, SSH, SSH_KEYGEN]

    def missing(self) -> list[str]:
        out = super().missing()
        if not os.path.exists(pam_python()):
            out.append("pam_python.so (libpam-python)")
        return out

    def host_dirs(self) -> list[Path]:
        return [PRIVSEP_DIR]

    def mounts(self, node: str) -> list[tuple[Path, Path]]:
        # Root's logins in a node get an empty home of the lab's: the host's ~/.bashrc,
        # which bash runs for every command sent over ssh, may write in the host's home
        # (pyenv's `rehash` takes a lock there; a login killed at teardown left it behind
        # and made every later root login wait 60 s).
        return [(self.lab.node_dir(node) / "pam.d", Path("/etc/pam.d")),
                (self.lab.dir / "ssh" / "ssh_config.d", Path("/etc/ssh/ssh_config.d")),
                (self.lab.dir / "root-home", Path(pwd.getpwuid(0).pw_dir))]

    def make_dirs(self) -> None:
        self.lab._make_ssh_dirs()

    def prepare(self) -> None:
        self._keygen = self.lab._start_keygen()

    def start(self) -> None:
        self.lab._make_ssh(self._keygen)
        self._procs = self.lab._spawn_sshds()

    def wait(self) -> None:
        self.lab._wait_sshds(self._procs)

    def pidfiles(self) -> list[Path]:
        pids = self.lab.dir / "pids"
        return sorted(pids.glob("sshd-*.pid")) if pids.is_dir() else []

    def stop(self, step: Steps) -> None:
        """All at once, then wait: every sshd exits at once on SIGTERM."""
        pidfiles = self.pidfiles()
        for pf in pidfiles:
            step(f"stop {pf.name}", self.lab._stop_pidfile, pf, signal.SIGTERM, False)
        super().stop(step)

    def node_status(self, node: str, state: Mapping[str, Any]) -> dict[str, Any]:
        pids = ({v: self.lab.sshd_pid(node, v) for v in SSHD_VARIANTS}
                if state.get("sshd") else {})
        return {"sshd_pids": pids}
