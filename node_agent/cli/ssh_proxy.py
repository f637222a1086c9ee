"""`ssh job.42` from any ssh client: ssh-to-job's `-ssh-config` block and `-proxy` mode.

`ssh-to-job -ssh-config` prints an OpenSSH ``Host job.*`` block for ``~/.ssh/config``
(`ssh_config_block`); with it, plain ``ssh job.42``, scp, sftp, rsync, ``ssh -L`` and
the tools built on them (VS Code Remote-SSH, Ansible) reach job 42. The block's
``ProxyCommand`` is ``ssh-to-job -proxy %n -port %p``: this module's `run_proxy`, whose
stdin and stdout are ssh's connection (a plain ProxyCommand, not ProxyUseFdpass: any ssh
client can run it, and the proxy is the one process between ssh and the agent's stream).
``%n`` is the host name as the user typed it: ssh lower-cases ``%h``, and job ids are
case-sensitive (``job.Run7`` is job ``Run7``, not ``run7``).

Host names (`job_of_host`, the one parser): ``job.ID``, or ``job.ID--NODE`` for a job
whose node is named (ssh-to-job's ``ID@NODE``: ssh itself splits ``user@host`` at the '@',
so the node rides after ``--``, which neither job ids nor node names contain). The job is
then found as ssh-to-job finds it (`locate_job`).

Keys (``~/.ssh/ssh-to-job/``, or ``-ssh-dir DIR``; a 0700 directory of the user's):
- ``id_ed25519`` is the user key, made on first use (by ``-ssh-config`` or the first
  proxy); its ``.pub`` is what the agent puts in the session's authorized_keys. The
  private key never leaves the directory.
- ``known_hosts`` gets the session's host key, which the agent sends in the stream's
  first frame, before the proxy relays sshd's first byte to ssh. ssh reads known_hosts
  only after the banner exchange (OpenSSH sshconnect.c ``ssh_login``:
  ``kex_exchange_identification`` and then ``ssh_kex2``, which orders host key
  algorithms from known_hosts and verifies the key in its KEX callback), and it cannot
  finish the banner exchange without that first byte, so ``StrictHostKeyChecking yes``
  holds without ever asking. ssh verifies again at every rekey (sshconnect2.c
  ``verify_host_key_callback`` is the KEX's callback), so the entry stays while the
  session lives and goes when the proxy ends.
- The entry's comment names the proxy (``ssh-to-job:NODE:PID:START``): each proxy adds
  its own, so two ``ssh job.42`` at once each keep their key; an update drops entries of
  proxies on this node that no longer run (killed before they could clean up), matched by
  pid and start time so a reused pid does not keep one alive. Updates take a lock
  (``lockf`` on ``lock``, which NFS homes support) and replace the file atomically, so a
  concurrent ssh reading it sees the old or the new file, never half of one.

A per-cluster CA signing session host keys (``@cert-authority``) was the alternative: it
would put a CA private key on every node (the agents sign), one more secret whose leak
lets anyone impersonate every session, while a session key here lives only as long as
its session and is only trusted for the name that session was asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from node_agent import config as config_mod
from node_agent import relaybuf, shellwire
from node_agent.auth import Authenticator, MungeAuthenticator
from node_agent.cli.common import CliError, UsageError
from node_agent.cli.ssh_to_job import (
    END_GRACE,
    PROG,
    Args,
    Located,
    _raise_signalled,
    _Signalled,
    backend_job_id,
    find_job,
    relay,
)
from node_agent.errors import InvalidRequest
from node_agent.relaybuf import Pacer, read_gathered

HOST_PREFIX = "job."
NODE_SEPARATOR = "--"
DEFAULT_DIR = "~/.ssh/ssh-to-job"
KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
LOCK = "lock"
LOCK_TIMEOUT = 10.0     # waiting for another proxy's update of known_hosts (a moment)
KEYGEN_TIMEOUT = 30.0
MARK = "ssh-to-job:"
# Not in a job host name: what ssh splits or refuses, and known_hosts' pattern characters
# (the name is written there as the session's host).
_NOT_IN_HOSTS = frozenset("@/:*?!,[]#\\'\"`$;&<>|(){}")

# Options of the two modes -> takes a value?
_OPTIONS = {"proxy": True, "port": True, "ssh-dir": True, "config": True, "debug": False,
            "ssh-config": False, "via": True}
# The other machine's ssh, in the -via block's KnownHostsCommand (which must be absolute).
LOCAL_SSH = "/usr/bin/ssh"
# An ssh destination for -via: a host name or ssh_config alias, optionally user@.
_DESTINATION = re.compile(r"(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ProxyArgs:
    """`-ssh-config` or `-proxy HOST`, parsed."""
    ssh_config: bool = False
    host: str = ""
    port: int = 22
    ssh_dir: str | None = None
    config: str | None = None
    debug: bool = False
    via: str | None = None


def wanted(argv: Sequence[str]) -> bool:
    """Whether argv asks for this module's modes: `-proxy` or `-ssh-config` among the
    options (never in a remote command after the job id)."""
    value_options = {"name", "ssh", "keygen-options", "shells", "config", "proxy", "port",
                     "ssh-dir", "via"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--" or not a.startswith("-") or a == "-":
            return False
        name, eq, _ = a.lstrip("-").partition("=")
        if name in ("proxy", "ssh-config"):
            return True
        i += 2 if name in value_options and not eq else 1
    return False


def parse_proxy_args(argv: Sequence[str]) -> ProxyArgs:
    """`-ssh-config [-ssh-dir DIR] [-config FILE]` or `-proxy HOST [-port N] [-ssh-dir DIR]
    [-config FILE] [-debug]`; raises UsageError."""
    opts: dict[str, Any] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, attached = a.lstrip("-").partition("=")
        if not a.startswith("-") or name not in _OPTIONS:
            raise UsageError(f"unexpected argument {a!r} with -proxy/-ssh-config")
        if _OPTIONS[name]:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option -{name} needs a value")
                attached = argv[i]
            opts[name] = attached
        elif eq:
            raise UsageError(f"option -{name} takes no value")
        else:
            opts[name] = True
        i += 1
    if ("proxy" in opts) == bool(opts.get("ssh-config")):
        raise UsageError("give either -proxy HOST or -ssh-config")
    if opts.get("ssh-config") and ("port" in opts or "debug" in opts):
        raise UsageError("-port and -debug go with -proxy")
    if "via" in opts and not opts.get("ssh-config"):
        raise UsageError("-via goes with -ssh-config")
    if "via" in opts and _DESTINATION.fullmatch(opts["via"]) is None:
        raise UsageError(f"-via: not an ssh destination: {opts['via']!r} (HOST or USER@HOST;"
                         " a port or options go in an ssh_config Host entry)")
    try:
        port = int(opts.get("port", "22"))
    except ValueError:
        raise UsageError(f"-port: not a number: {opts['port']!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"-port: out of range: {port}")
    return ProxyArgs(ssh_config=bool(opts.get("ssh-config")), host=opts.get("proxy", ""),
                     port=port, ssh_dir=opts.get("ssh-dir"), config=opts.get("config"),
                     via=opts.get("via"),
                     debug=bool(opts.get("debug")))


# -- names ----------------------------------------------------------------------------------

def job_of_host(host: str) -> str:
    """The job id a host name stands for: ``job.42`` -> ``42``, ``job.42.0`` -> ``42.0``,
    ``job.42--node17`` -> ``42@node17`` (the job on that node). UsageError otherwise."""
    if not host.lower().startswith(HOST_PREFIX):
        raise UsageError(f"{host!r} is not a job host name (job.ID or job.ID--NODE)")
    rest = host[len(HOST_PREFIX):]
    job, sep, node = rest.rpartition(NODE_SEPARATOR)
    if not sep:
        job, node = rest, ""
    if not job or (sep and not node) or any(c in _NOT_IN_HOSTS or not c.isprintable()
                                            or c.isspace() for c in rest):
        raise UsageError(f"{host!r} is not a job host name (job.ID or job.ID--NODE)")
    return f"{job}@{node}" if node else job


def known_hosts_name(host: str, port: int) -> str:
    """The name ssh looks the host key up by with a ProxyCommand and no HostKeyAlias
    (sshconnect.c get_hostfile_hostname_ipaddr: ``host``, or ``[host]:port`` off port 22),
    in lower case as ssh has it."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def _config_value(text: str) -> str:
    # ssh_config: %-tokens are expanded in these values; blanks need double quotes.
    text = text.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def program_argv() -> list[str]:
    """How ssh should run this program: the installed `ssh-to-job` script, else this
    interpreter with the module."""
    me = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(me) == PROG and os.path.isfile(me):
        return [me]
    return [sys.executable, "-m", "node_agent.cli.ssh_to_job"]


def ssh_config_block(program: Sequence[str], ssh_dir: str | None = None,
                     config: str | None = None, via: str | None = None,
                     remote_dir: str | None = None) -> str:
    """The ``Host job.*`` block. Pure. `program` is how ssh runs ssh-to-job, `ssh_dir` an
    absolute directory instead of ~/.ssh/ssh-to-job, `config` an agent configuration.

    With `via` (an ssh destination: the login node where this runs), the block is for
    another machine, one without ssh-to-job or MUNGE (a laptop): ssh there runs the proxy
    on `via` through ssh, with the private key of its own ~/.ssh/ssh-to-job, and reads
    the session's host key from the proxy's known_hosts on `via` (`remote_dir`, absolute)
    with KnownHostsCommand (OpenSSH 8.5 or later), so strict checking stays on."""
    base = ssh_dir or DEFAULT_DIR
    proxy = list(program)
    if ssh_dir:
        proxy += ["-ssh-dir", ssh_dir]
    if config:
        proxy += ["-config", config]
    # ssh expands %-tokens in these commands: '%' of a path is written '%%'; %n is the
    # host name as typed (ssh lower-cases %h; job ids are case-sensitive), %p the port.
    command = shlex.join(proxy).replace("%", "%%") + " -proxy %n -port %p"
    if via is None:
        return "\n".join([
            "# ssh job.ID / job.ID--NODE: a session inside a running job (ssh-to-job "
            "-ssh-config).",
            "# Put it above any 'Host *' section: ssh keeps the first value it gets for an "
            "option.",
            "Host job.*",
            f"    ProxyCommand {command}",
            *_keys(_config_value(base + '/' + KEY), _config_value(base + '/' + KNOWN_HOSTS)),
        ])
    remote = remote_dir or base
    known = shlex.join(["cat", f"{remote}/{KNOWN_HOSTS}"]).replace("%", "%%")
    return "\n".join([
        f"# ssh job.ID / job.ID--NODE from a machine without ssh-to-job, through {via}",
        f"# (ssh-to-job -ssh-config -via {via}; OpenSSH 8.5 or later). Put it above any",
        "# 'Host *' section. Its key is this machine's own; make it once, here:",
        f"#   ssh-keygen -t ed25519 -N '' -f {DEFAULT_DIR}/{KEY}",
        f"#   ssh {via} 'umask 077; mkdir -p {remote} && cat > {remote}/{KEY}.pub' "
        f"< {DEFAULT_DIR}/{KEY}.pub",
        "# (a ControlMaster for the login node saves a connection per ssh job.ID).",
        "# KnownHostsCommand needs the absolute path of this machine's ssh.",
        "Host job.*",
        # The remote commands quoted for the local shell (ProxyCommand) or ssh's own
        # argument splitting (KnownHostsCommand); ssh substitutes %n and %p first.
        f"    ProxyCommand ssh {via} {shlex.quote(command)}",
        f"    KnownHostsCommand {LOCAL_SSH} {via} {shlex.quote(known)}",
        *_keys(f"{DEFAULT_DIR}/{KEY}", "/dev/null"),
    ])


def _keys(identity: str, known_hosts: str) -> list[str]:
    """The end of both blocks: the dedicated key only, and host key checking that
    accepts only the session's key, from the proxy."""
    return [f"    IdentityFile {identity}", "    IdentitiesOnly yes",
            "    PreferredAuthentications publickey", f"    UserKnownHostsFile {known_hosts}",
            "    GlobalKnownHostsFile /dev/null", "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no", "    CheckHostIP no", ""]


# -- the key directory -------------------------------------------------------------------

def key_dir(ssh_dir: str | None) -> str:
    """The directory's absolute path: ``-ssh-dir``, else ~/.ssh/ssh-to-job of the passwd
    home (what ssh expands ``~`` to, not $HOME)."""
    if ssh_dir:
        return os.path.abspath(ssh_dir)
    return os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh", "ssh-to-job")


def ensure_dir(path: str) -> str:
    """Make `path` (0700; and ~/.ssh, 0700, if missing) or check that it is a real
    directory of the caller's that nobody else can enter. CliError otherwise."""
    parent = os.path.dirname(path)
    if os.path.basename(parent) == ".ssh" and not os.path.lexists(parent):
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, 0o700)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CliError("Key directory", f"cannot make {path}: {e.strerror or e}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CliError("Key directory", f"{path} must be a directory of yours with mode 0700"
                       f" (it is {stat.filemode(st.st_mode)}, uid {st.st_uid})")
    return path


@contextlib.contextmanager
def locked(directory: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the directory's lock (lockf on `lock`: a POSIX lock, which NFS carries)."""
    fd = os.open(os.path.join(directory, LOCK),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise CliError("Known hosts", f"{directory}/{LOCK} stayed locked for "
                                   f"{timeout:g} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_key(directory: str) -> str:
    """The dedicated key's public line, the pair made first if missing (under the lock,
    so two first uses at once make one key; into temporary names, renamed public first,
    so ssh never sees a private key without its .pub). A directory with the .pub alone
    is a login node's for another machine (`-ssh-config -via`), which keeps the private
    key: its .pub is used as it is."""
    key = os.path.join(directory, KEY)
    if not os.path.exists(key + ".pub"):
        with locked(directory):
            if not os.path.exists(key + ".pub"):
                tmp = os.path.join(directory, f".{KEY}.{os.getpid()}")
                for p in (tmp, tmp + ".pub"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
                cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                       f"ssh-to-job@{os.uname().nodename}", "-f", tmp]
                try:
                    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                       text=True, timeout=KEYGEN_TIMEOUT)
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise CliError("Key generation", f"ssh-keygen: {e}") from None
                if r.returncode != 0:
                    why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])
                    raise CliError("Key generation", why[-1])
                os.replace(tmp + ".pub", key + ".pub")
                os.replace(tmp, key)
    try:
        with open(key + ".pub", encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError("Key", f"cannot read {key}.pub: {e}") from None


# -- known_hosts --------------------------------------------------------------------------

def process_start(pid: int, procfs: str = "/proc") -> str | None:
    """A process's start time (field 22 of its stat), None when it does not exist."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, ValueError):  # Race: it exited meanwhile
        return None


def marker(node: str, pid: int, procfs: str = "/proc") -> str:
    """This proxy's mark on its known_hosts entry."""
    return f"{MARK}{node}:{pid}:{process_start(pid, procfs) or '0'}"


def _stale(mark: str, node: str, procfs: str) -> bool:
    """An entry of a proxy on this node that no longer runs."""
    try:
        m_node, pid, start = mark[len(MARK):].rsplit(":", 2)
        return m_node == node and process_start(int(pid), procfs) != start
    except ValueError:
        return False


def _rewrite(directory: str, keep: Callable[[str], bool], add: str = "") -> None:
    """known_hosts with the lines `keep` accepts, plus `add`; atomically (rename)."""
    path = os.path.join(directory, KNOWN_HOSTS)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    text = "".join(line + "\n" for line in lines if keep(line)) + add
    tmp = os.path.join(directory, f".{KNOWN_HOSTS}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _mark_of(line: str) -> str:
    fields = line.split()
    return fields[3] if len(fields) >= 4 and fields[3].startswith(MARK) else ""


def add_host_key(directory: str, name: str, host_key: str, mark: str, node: str,
                 procfs: str = "/proc") -> None:
    """Add ``name KEYTYPE KEY mark`` to known_hosts; drop stale entries of this node's
    proxies on the way."""
    fields = host_key.split()
    if len(fields) < 2 or not all(f.isprintable() for f in fields[:2]):
        raise CliError("Protocol", "the agent's host key is not 'TYPE KEY'")
    with locked(directory):
        _rewrite(directory, lambda line: not _stale(_mark_of(line), node, procfs)
                 if _mark_of(line) else True,
                 f"{name} {fields[0]} {fields[1]} {mark}\n")


def remove_host_key(directory: str, mark: str) -> None:
    """Remove this proxy's entry."""
    with locked(directory):
        _rewrite(directory, lambda line: _mark_of(line) != mark)


# -- the proxy ----------------------------------------------------------------------------

def locate_job(cfg: Any, job_id: str, auth: Authenticator, err: TextIO) -> Located:
    """Where `job_id` (``ID`` or ``ID@NODE``) runs, found as ssh-to-job finds it
    (`find_job`: the named node's agent; else the backend's way, Slurm's squeue or the
    native registry's homes and fan-out over `nodes`), with ssh-to-job's reading of the id
    (`backend_job_id`: CLUSTER.PROC)."""
    return find_job(backend_job_id(Args(job_id=job_id), cfg.backend), cfg, auth, err)


class StdioEnd:
    """ssh's end of the proxy: our stdin (ssh's output) and stdout (ssh's input), pipes
    (OpenSSH's ProxyCommand). Half-close: closing stdout is ssh's EOF."""

    def __init__(self, rfd: int = 0, wfd: int = 1) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._inbound = Pacer()
        self._write_open = True

    def read(self, n: int) -> list[bytes]:
        """What ssh sent, in pieces; [] at its end."""
        try:
            return read_gathered(self.rfd, n, linger=self._inbound.linger())
        except OSError:
            return []

    def write(self, data: bytes | memoryview) -> None:
        """All of `data` to ssh (OSError when ssh is gone)."""
        self._inbound.saw(len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def close_write(self) -> None:
        """ssh's EOF (the session's half-close)."""
        if self._write_open:
            self._write_open = False
            os.close(self.wfd)


def _shells(environ: dict[str, str] | os._Environ[str]) -> tuple[str, ...]:
    shells = (environ["SHELL"],) if environ.get("SHELL") else ()
    try:
        shellwire.validate_shells(shells)
    except InvalidRequest:
        return ()
    return shells


def run_proxy(args: ProxyArgs, cfg: Any, auth: Authenticator, err: TextIO, *,
              rfd: int = 0, wfd: int = 1, procfs: str = "/proc") -> int:
    """The ProxyCommand: find the job, open the session, put its host key in known_hosts,
    relay between ssh (rfd/wfd) and the stream. 0 once the session ran; 1 with one line
    when it could not be had."""
    job_id = job_of_host(args.host)
    name = known_hosts_name(args.host, args.port)
    directory = ensure_dir(key_dir(args.ssh_dir))
    ensure_key(directory)
    where = locate_job(cfg, job_id, auth, err)
    node = os.uname().nodename
    mark = marker(node, os.getpid(), procfs)
    tmp = tempfile.mkdtemp(prefix="ssh-to-job-proxy.")  # 0700: relay() writes the key here
    end = StdioEnd(rfd, wfd)
    state: dict[str, Any] = {"call": None, "added": False, "error": "", "closing": False}

    def connect() -> StdioEnd:
        # relay() calls this with the host key written to tmp and nothing relayed yet.
        with open(os.path.join(tmp, KNOWN_HOSTS), encoding="ascii") as f:
            host_key = f.read().split(None, 1)[1]
        add_host_key(directory, name, host_key, mark, node, procfs)
        state["added"] = True
        return end

    def on_call(call: Any) -> None:
        state["call"] = call
        if state["closing"]:
            call.cancel()

    def body() -> None:
        try:
            state["error"] = relay(
                target=where.target, job_id=where.job.id, pubkey=os.path.join(directory,
                                                                              KEY + ".pub"),
                known_hosts=os.path.join(tmp, KNOWN_HOSTS), alias=name,
                shells=_shells(os.environ), auth=auth, connect=connect, err=err,
                debug=args.debug, on_call=on_call, local_node=cfg.node_name)
        except CliError as e:
            state["error"] = f"{e.category}: {e}"
        except OSError as e:
            state["error"] = f"Known hosts: {e.strerror or e}"

    relaybuf.keep_buffers_in_heap()
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            saved[s] = signal.signal(s, _raise_signalled)
    thread = threading.Thread(target=body, name="proxy-relay", daemon=True)
    rc = 0
    try:
        if args.debug:
            err.write(f"{PROG}: job {where.job.id} of {where.job.user} on {where.node} "
                      f"({where.target}), known as {name}\n")
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    except _Signalled as e:
        # ssh ends its ProxyCommand with SIGHUP when it exits: let the agent end the
        # session (our stdin's EOF reached sshd), then cancel what is left.
        rc = 128 + e.signum
        thread.join(END_GRACE)
    finally:
        # No signal may cut the clean-up short: ssh's SIGHUP is often followed by the
        # terminal's (a closed tmux pane, a dropped login), which left the entry behind.
        for s in saved:
            signal.signal(s, signal.SIG_IGN)
        state["closing"] = True
        if state["call"] is not None:
            state["call"].cancel()
        thread.join(5)
        if state["added"]:
            with contextlib.suppress(OSError, CliError):
                remove_host_key(directory, mark)
        shutil.rmtree(tmp, ignore_errors=True)
        for s, h in saved.items():
            signal.signal(s, h)
    if state["error"]:
        category, _, message = state["error"].partition(": ")
        raise CliError(category, message or category)
    return rc


def main(argv: Sequence[str], out: TextIO, err: TextIO,
         authenticator: Authenticator | None = None, program: Sequence[str] | None = None,
         ) -> int:
    """ssh-to-job's `-ssh-config` and `-proxy` modes (ssh_to_job.main dispatches here)."""
    args = parse_proxy_args(argv)
    if args.ssh_config:
        config = args.config or os.environ.get(config_mod.ENV_VAR) or None
        ssh_dir = os.path.abspath(args.ssh_dir) if args.ssh_dir else None
        directory = ensure_dir(key_dir(ssh_dir))
        if args.via is None:
            ensure_key(directory)   # (with -via, the other machine makes its key)
        out.write(ssh_config_block(program or program_argv(), ssh_dir,
                                   os.path.abspath(config) if config else None,
                                   via=args.via, remote_dir=directory))
        return 0
    cfg = config_mod.find(args.config)
    auth = authenticator or MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
    return run_proxy(args, cfg, auth, err)
