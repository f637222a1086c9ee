"""`ssh-to-job`: an ssh session inside a running job, through the node agent.

The client side; the agent's is node_agent/agent/sessions.py. No sshd ever listens: this CLI
makes a key pair in a private temp directory (the private key never leaves it), opens the
agent's
`OpenJobShell` stream with a MUNGE credential and the public key (`Relay`), and at the
same time runs the user's ssh (or scp, sftp, rsync's ssh). ssh's `ProxyCommand` is
`fdpass.py`, which connects to this process's Unix socket in the temp directory and
hands that connection to ssh (`ProxyUseFdpass`), so ssh talks to this process directly
and one process relays between ssh and the stream, with half-close. The session's host
key arrives in the stream's first frame and is written into the private known_hosts
before a single byte reaches ssh, so strict host key checking stays on. `-ssh-config` and
`-proxy` (`ssh job.42` from any ssh client) are node_agent/cli/ssh_proxy.py's.

The command line is built by one pure function, `build_command()` (ClusterShell's
Worker/Ssh.py), so tests check it before anything runs. Exit status: the remote
command's (ssh's), 1 when the session could not be set up (one line
`ssh-to-job: Category: why`), 2 for bad arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, TextIO

import grpc

from node_agent import __version__, jobids, relaybuf, shellwire
from node_agent import config as config_mod
from node_agent.auth import Authenticator, MungeAuthenticator
from node_agent.cli import locate as locate_mod
from node_agent.cli.common import CATEGORIES, CliError, UsageError, run
from node_agent.client import AgentClient
from node_agent.errors import AuthError, ImpostorError, InvalidRequest
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.relaybuf import Pacer, read_gathered

PROG = "ssh-to-job"
CHUNK = 1 << 20  # socket buffers between ssh and the relay
# How long the relay waits for the agent's `opened` frame (it makes a host key and starts
# sshd); the stream itself has no deadline, a session lasts as long as the user wants.
OPEN_TIMEOUT = 30.0
RETRY_INTERVAL = 2.0
# After ssh exits, how long the agent may take to end the session before we cancel it.
END_GRACE = 3.0
# How long ssh may take to send its banner once its ProxyCommand connected (no session).
SILENCE_WAIT = 10.0

USAGE = """\
usage: ssh-to-job [options] JOBID[@NODE] [remote-command ...]
       ssh-to-job -ssh-config [-via LOGIN] [-ssh-dir DIR] [-config FILE] >> ~/.ssh/config
       ssh-to-job -proxy HOST [-port PORT] [-ssh-dir DIR] [-config FILE] [-debug]

Open an ssh session inside a running job: the job's user, cgroups, namespaces,
environment and working directory. No sshd listens on the network; the session rides
the node agent's gRPC stream. Options take one or two dashes (-name or --name).

Finding the job (from any node, a login node too): JOBID@NODE (as `adoptctl jobs`
prints it) or -name NODE asks that node's agent; else with backend = "slurm" one
squeue call names the job's BatchHost; else the job's two homes among the
configuration's `nodes` say where it runs, and if they do not know, the agents of
all of `nodes` are asked, locate_parallel at a time, and the first that runs the
job wins; without `nodes`, the agent of the node ssh-to-job runs on.

options:
  -help                 show this help and exit
  -version              print the version and exit
  -debug                verbose ssh (-v), relay messages, where the job was found
                        and which nodes did not answer
  -name NODE            ask this node's agent, without searching
  -ssh "PROG ARGS"      run PROG instead of ssh: scp, "scp -r", sftp, ...
  -keygen-options "..." extra ssh-keygen options for the session key
  -shells SH1,SH2       login shells to try in the job (absolute paths, at most 16):
                        the first executable one wins (default: your $SHELL; else
                        /bin/sh)
  -auto-retry           the job is not running yet: wait until it runs (the same
                        search again every 2 s)
  -remove-on-interrupt  end the job when ssh-to-job is interrupted (Ctrl-C, SIGTERM,
                        SIGHUP) while the session is open; for the job's owner, where
                        the agent ends jobs (the native registry); refused before the
                        session opens elsewhere (Slurm: scancel ends a job)
  -X / -x               enable / disable X11 forwarding
  -config FILE          agent configuration (default: $CALLERID_ADOPT_CONFIG, then
                        /etc/callerid-adopt/agent.toml)

ssh job.42 from any ssh client (scp, sftp, rsync -e ssh, ssh -L, VS Code, Ansible):
  -ssh-config           print a "Host job.*" block for ~/.ssh/config (put it above any
                        "Host *"); makes the dedicated key ~/.ssh/ssh-to-job/id_ed25519
                        on first use. Then: ssh job.42 (found as above), or
                        ssh job.42--node17 (JOBID@NODE: the job on node17)
  -via LOGIN            with -ssh-config: a block for another machine (a laptop) that
                        has ssh only; its ssh runs the proxy here, on LOGIN, through
                        ssh, and reads the session's host key from here (see README)
  -proxy HOST           the block's ProxyCommand (ssh runs it with %n and -port %p):
                        relays ssh's stdin/stdout to the session, after writing the
                        session's host key to ~/.ssh/ssh-to-job/known_hosts
  -ssh-dir DIR          the key and known_hosts directory instead of ~/.ssh/ssh-to-job
                        (a 0700 directory of yours)

examples:
  ssh-to-job 42                          # a shell inside job 42
  ssh-to-job 42 hostname                 # a command; its exit status is ours
  ssh-to-job 42@node17 hostname          # the job on node17: no search
  ssh-to-job -ssh scp 42 remote:out.dat .       # any placeholder host name
  ssh-to-job -ssh scp 42 input.dat remote:      # upload
  ssh-to-job -ssh sftp 42
  rsync -av -e ssh-to-job 42:results/ ./results/ # the job id where a host would be
  ssh-to-job -auto-retry 42              # wait for a job that has not started yet
  ssh-to-job 42.0                        # CLUSTER.PROC: job 42 where job ids are
                                         # numbers (Slurm; a PROC other than 0 is an
                                         # error); elsewhere "42.0" is a name as any

A session lasts as long as its job: when the job ends, its sessions end with it (as
a Slurm job's end kills its extern step; HTCondor instead keeps the slot until the
sessions close).

exit status: the remote command's; 1 when the session could not be set up; 2 for bad
arguments; 128+N when interrupted by signal N.
"""

# Long options (either dash style) -> takes a value?
_LONG = {"help": False, "version": False, "debug": False, "name": True, "ssh": True,
         "keygen-options": True, "shells": True, "auto-retry": False, "config": True,
         "remove-on-interrupt": False}
# ssh-style short options that rsync (or a user's -e "...") may put before the host.
# Value-taking ones: -l USER (the login is always the job's user), -p PORT (meaningless
# here), -o OPTION (passed on to ssh after our own, so ours win: ssh keeps the first
# value of an option).
_SHORT_VALUE = {"l", "p", "o"}
_SHORT_PASS = {"T", "q", "C", "t", "A", "a"}  # passed on to ssh as they are
_SHORT_IGNORED = {"4", "6"}


@dataclass(frozen=True)
class Args:
    """ssh-to-job's command line, parsed."""
    job_id: str = ""
    remote: tuple[str, ...] = ()
    ssh: tuple[str, ...] = ("ssh",)
    name: str | None = None
    keygen_options: tuple[str, ...] = ()
    shells: tuple[str, ...] = ()
    auto_retry: bool = False
    x11: bool | None = None
    debug: bool = False
    login_user: str | None = None
    passthrough: tuple[str, ...] = ()
    config: str | None = None
    remove_on_interrupt: bool = False
    help: bool = False
    version: bool = False


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> Args:
    """condor_ssh_to_job's surface plus the ssh options rsync emits; raises UsageError."""
    env = os.environ if environ is None else environ
    opts: dict[str, Any] = {}
    passthrough: list[str] = []
    i = 0
    argv = list(argv)

    def value(name: str) -> str:
        nonlocal i
        i += 1
        if i >= len(argv):
            raise UsageError(f"option -{name} needs a value")
        return argv[i]

    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        word = a.lstrip("-")
        name, eq, attached = word.partition("=")
        if a.startswith("--") or name in _LONG or name == "h":
            if name == "h":
                name = "help"
            if name not in _LONG:
                raise UsageError(f"unknown option {a}")
            if _LONG[name]:
                v = attached if eq else value(name)
                opts[name] = v
            elif eq:
                raise UsageError(f"option {a.split('=')[0]} takes no value")
            else:
                opts[name] = True
            i += 1
            continue
        # A cluster of ssh-style short options: -X, -x, -l alice, -lalice, -Tq, -oFoo=bar.
        j = 0
        while j < len(word):
            c = word[j]
            if c in ("X", "x"):
                opts["x11"] = c == "X"
            elif c in _SHORT_VALUE:
                v = word[j + 1:] or value(c)
                if c == "l":
                    opts["login_user"] = v
                elif c == "o":
                    passthrough += ["-o", v]
                break
            elif c in _SHORT_PASS:
                passthrough.append(f"-{c}")
            elif c in _SHORT_IGNORED:
                pass
            else:
                raise UsageError(f"unknown option {a}")
            j += 1
        i += 1
    if opts.get("help"):
        return Args(help=True)
    if opts.get("version"):
        return Args(version=True)
    if i >= len(argv):
        raise UsageError("missing JOBID (see ssh-to-job -help)")
    job_id = argv[i]
    remote = tuple(argv[i + 1:])
    # JOB or JOB@NODE (node_agent/cli/locate.py parses it; checked here for the one line).
    locate_mod.parse_ref(job_id)
    try:
        ssh = tuple(shlex.split(opts.get("ssh", "ssh")))
        keygen = tuple(shlex.split(opts.get("keygen-options", "")))
    except ValueError as e:
        raise UsageError(f"cannot split option value: {e}") from None
    if not ssh:
        raise UsageError("-ssh needs a program")
    if "shells" in opts:
        shells = tuple(s for s in opts["shells"].split(",") if s)
        try:
            shellwire.validate_shells(shells)
        except InvalidRequest as e:
            raise UsageError(f"-{e}") from None   # "-shells: '...' is not ..."
    else:
        # $SHELL is only a preference: one the agent would refuse is left out.
        shells = (env["SHELL"],) if env.get("SHELL") else ()
        try:
            shellwire.validate_shells(shells)
        except InvalidRequest:
            shells = ()
    return Args(job_id=job_id, remote=remote, ssh=ssh, name=opts.get("name"),
                keygen_options=keygen, shells=shells, auto_retry=bool(opts.get("auto-retry")),
                x11=opts.get("x11"), debug=bool(opts.get("debug")),
                login_user=opts.get("login_user"), passthrough=tuple(passthrough),
                config=opts.get("config"),
                remove_on_interrupt=bool(opts.get("remove-on-interrupt")))


def backend_job_id(args: Args, backend: str) -> Args:
    """`args` with the job id the backend knows (node_agent.jobids: `42.0` is Slurm's job
    42); UsageError, one line, for an id that names no job there (`42.1` on Slurm)."""
    ref = locate_mod.parse_ref(args.job_id)  # JOB@NODE: the job part (cli/locate.py)
    try:
        job_id = locate_mod.format_ref(jobids.cluster_proc(ref.job_id, backend), ref.node)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args if job_id == args.job_id else replace(args, job_id=job_id)


# -- the command line -------------------------------------------------------------------

def alias_of(job_id: str) -> str:
    """The host name ssh knows the session by (HostKeyAlias and destination): no ':', '@',
    '/' or blanks, so that scp and ssh parse it as a host."""
    return "job-" + re.sub(r"[^A-Za-z0-9._-]", "_", job_id) + ".ssh-to-job"


def _is_remote(arg: str) -> bool:
    """scp's rule: HOST:PATH with no '/' before the first ':' (./a:b and /x:y are local)."""
    if arg.startswith("-"):
        return False
    head, colon, _ = arg.partition(":")
    return bool(colon) and bool(head) and "/" not in head


def rewrite_remote(arg: str, alias: str) -> str:
    """`[user@]placeholder:path` -> `alias:path`; anything else unchanged."""
    if not _is_remote(arg):
        return arg
    return alias + ":" + arg.partition(":")[2]


def _ssh_value(text: str) -> str:
    # ssh splits -o values on blanks unless quoted.
    return f'"{text}"' if any(c.isspace() for c in text) else text


def build_command(ssh: Sequence[str], *, key: str, known_hosts: str, job_id: str, user: str,
                  proxy: Sequence[str], remote: Sequence[str] = (), debug: bool = False,
                  x11: bool | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ssh/scp/sftp command line. Pure: no I/O, no environment.

    `ssh` is the program and its own arguments (`-ssh "scp -r"`), `remote` what followed
    the job id (a remote command for ssh, file arguments for scp, options for sftp),
    `proxy` the argv of the proxy, `extra` ssh options rsync passed through. Our options
    come first: ssh keeps the first value it gets for an option, so nothing later can
    turn host key checking off.
    """
    prog, prog_args = ssh[0], list(ssh[1:])
    kind = os.path.basename(prog)
    alias = alias_of(job_id)
    proxy_cmd = shlex.join(proxy).replace("%", "%%")  # ssh expands %-tokens in it
    cmd = [prog, "-F", "/dev/null",  # the user's ~/.ssh/config (ProxyJump, Control*) stays out
           "-i", key,
           "-o", "IdentitiesOnly=yes",
           "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={_ssh_value(known_hosts)}",
           "-o", "GlobalKnownHostsFile=/dev/null",
           "-o", f"HostKeyAlias={alias}",
           "-o", "CheckHostIP=no",
           "-o", "UpdateHostKeys=no",
           "-o", "BatchMode=yes",
           "-o", "PreferredAuthentications=publickey",
           "-o", "ControlMaster=no",
           "-o", "ControlPath=none",
           "-o", f"User={user}",
           "-o", f"ProxyCommand={proxy_cmd}",
           "-o", "ProxyUseFdpass=yes"]
    if debug:
        cmd.append("-v")
    if kind == "scp":
        targets = [rewrite_remote(a, alias) for a in remote]
        if not any(_is_remote(a) for a in remote):
            raise ValueError("scp needs a HOST:PATH argument (any host name, e.g. remote:file)")
        return cmd + prog_args + list(extra) + targets
    if kind == "sftp":
        if any(_is_remote(a) for a in remote):
            return cmd + prog_args + list(extra) + [rewrite_remote(a, alias) for a in remote]
        return cmd + prog_args + list(extra) + list(remote) + [alias]
    if x11 is not None:
        cmd.append("-X" if x11 else "-x")
    cmd += prog_args + list(extra) + [alias]
    if remote:
        cmd += ["--", *remote]
    return cmd


FDPASS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fdpass.py")


def proxy_argv(sock: str, python: str | None = None) -> list[str]:
    """The ProxyCommand's argv: node_agent/cli/fdpass.py, which hands ssh a connection to
    this process's socket (ProxyUseFdpass)."""
    return [python or sys.executable, "-I", "-S", FDPASS, sock]


# -- finding the job ----------------------------------------------------------------------

# Located, and everything about where a job runs, is node_agent/cli/locate.py's (issue 12).
Located = locate_mod.Located


def find_job(args: Args, cfg: Any, auth: Authenticator, err: TextIO,
             sleep: Callable[[float], None] = time.sleep) -> Located:
    """Where the job of `args` runs, by the CLIs' one location module: -name NODE or a
    JOB@NODE reference asks that node; else the backend's way (Slurm: one squeue call;
    native: the job's homes, else the fan-out over the configuration's `nodes`; or this
    node's agent)."""
    ref = locate_mod.parse_ref(args.job_id)
    if args.name and ref.node and args.name != ref.node:
        raise UsageError(f"-name {args.name} and {args.job_id} name different nodes")
    return locate_mod.Locator(cfg, auth, err, debug=args.debug, prog=PROG, sleep=sleep).locate(
        ref.job_id, node=args.name or ref.node, auto_retry=args.auto_retry)


# -- the session --------------------------------------------------------------------------

class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signum)


@dataclass
class _Handlers:
    saved: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGHUP):
            self.saved[s] = signal.signal(s, _raise_signalled)

    def restore(self) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)
        self.saved.clear()


def start_keygen(tmp: str, options: Sequence[str]) -> subprocess.Popen[str]:
    """Start making the session's key pair in `tmp` (key, key.pub); `finish_keygen`
    waits for it. The key is made while the job is being located."""
    cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ssh-to-job",
           "-f", os.path.join(tmp, "key"), *options]
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise CliError("Key generation", f"cannot run ssh-keygen: {e}") from None


def finish_keygen(proc: subprocess.Popen[str]) -> None:
    """Wait for ssh-keygen started by `start_keygen`; CliError when it failed."""
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        why = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise CliError("Key generation", why)


def run_session(args: Args, cfg: Any, auth: Authenticator, err: TextIO,
                sleep: Callable[[float], None] = time.sleep) -> int:
    """Find the job, open a session and run ssh through it; ssh's exit status."""
    args = backend_job_id(args, cfg.backend)
    handlers = _Handlers()
    handlers.install()
    tmp = tempfile.mkdtemp(prefix="ssh-to-job.")  # mode 0700
    relay: Relay | None = None
    key: subprocess.Popen[str] | None = None
    try:
        key = start_keygen(tmp, args.keygen_options)
        where = find_job(args, cfg, auth, err, sleep)
        finish_keygen(key)
        relaybuf.keep_buffers_in_heap()  # no page fault per byte relayed
        relay = Relay(target=where.target, job_id=where.job.id, tmp=tmp, shells=args.shells,
                      auth=auth, err=err, debug=args.debug, local_node=cfg.node_name,
                      remove_on_interrupt=args.remove_on_interrupt)
        relay.start()  # the agent starts the session while ssh starts
        cmd = build_command(args.ssh, key=os.path.join(tmp, "key"),
                            known_hosts=os.path.join(tmp, "known_hosts"), job_id=where.job.id,
                            user=where.job.user, proxy=proxy_argv(relay.sock_path),
                            remote=args.remote, debug=args.debug, x11=args.x11,
                            extra=args.passthrough)
        if args.debug:
            err.write(f"{PROG}: job {args.job_id} of {where.job.user} on {where.node} "
                      f"({where.target})\n{PROG}: {shlex.join(cmd)}\n")
        try:
            rc = subprocess.run(cmd).returncode
        except FileNotFoundError:
            raise CliError("Cannot run", f"{args.ssh[0]}: not found") from None
        # ssh is done: let the agent finish the session (it ends the stream once the
        # session's processes and files are gone), so nothing is left when we return.
        relay.close(grace=END_GRACE)
        # No session (ssh exits 255, or the relay ended it quietly): the relay's one line.
        if relay.error and (rc == 255 or relay.silenced):
            category, _, message = relay.error.partition(": ")
            raise CliError(category, message or category)
        if rc < 0:
            return 128 - rc
        return rc
    except _Signalled as e:
        _interrupted(relay, err)
        return 128 + e.signum
    except KeyboardInterrupt:
        _interrupted(relay, err)
        raise
    finally:
        if key is not None and key.poll() is None:  # the job was not found, or a signal
            key.kill()
            key.communicate()
        if relay is not None:
            relay.close()
        shutil.rmtree(tmp, ignore_errors=True)
        handlers.restore()


# -- the relay ----------------------------------------------------------------------------

class _End:
    """ssh's end of the relay: the socket ssh got from fdpass.py."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._inbound = Pacer()  # bulk to ssh -> its small replies may linger (relaybuf)

    def read(self, n: int) -> list[bytes]:
        try:
            return read_gathered(self.sock.fileno(), n, linger=self._inbound.linger())
        except OSError:
            return []

    def write(self, data: bytes | memoryview) -> None:
        self._inbound.saw(len(data))
        self.sock.sendall(data)

    def close_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        # shutdown first: close() alone neither wakes the relay thread blocked reading
        # this socket nor tells ssh anything while that read holds the socket, and ssh
        # then waited for the job to end when the agent died (kill -9).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Relay:
    """Opens the agent's OpenJobShell stream and relays it to the one connection ssh makes
    to `sock_path` (through fdpass.py), with half-close.

    The session is opened as soon as `start` is called, in parallel with ssh's own start;
    the session's host key is written to known_hosts before a single byte reaches ssh, so
    strict host key checking stays on. When the session cannot be had, `error` holds
    `Category: message` for the CLI's one line, and ssh's connection is closed.
    """

    def __init__(self, *, target: str, job_id: str, tmp: str, shells: Sequence[str],
                 auth: Authenticator, err: TextIO, debug: bool = False,
                 open_timeout: float = OPEN_TIMEOUT, local_node: str | None = None,
                 remove_on_interrupt: bool = False) -> None:
        self.target, self.job_id, self.tmp = target, job_id, tmp
        self.removal = Removal() if remove_on_interrupt else None
        self.local_node = local_node
        self.shells, self.auth, self.err, self.debug = list(shells), auth, err, debug
        self.open_timeout = open_timeout
        self.sock_path = os.path.join(tmp, "proxy.sock")
        self.error = ""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.sock_path)
        self._listener.listen(1)
        self._end: _End | None = None
        self._thread: threading.Thread | None = None
        self._call: Any = None
        self._closing = False
        # No session: ssh was ended without a word (`_silence_ssh`), on a connection kept
        # open until ssh is gone.
        self.silenced = False
        self._held: socket.socket | None = None

    def start(self) -> None:
        """Start relaying in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()

    def _accept(self) -> _End:
        conn, _ = self._listener.accept()
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            conn.setsockopt(socket.SOL_SOCKET, opt, CHUNK)
        self._end = _End(conn)
        return self._end

    def _run(self) -> None:
        try:
            self.error = relay(target=self.target, job_id=self.job_id,
                               pubkey=os.path.join(self.tmp, "key.pub"),
                               known_hosts=os.path.join(self.tmp, "known_hosts"),
                               alias=alias_of(self.job_id), shells=self.shells,
                               auth=self.auth, connect=self._accept, err=self.err,
                               debug=self.debug, open_timeout=self.open_timeout,
                               on_call=self._set_call, local_node=self.local_node,
                               removal=self.removal)
            if self.error and self._end is None and not self._closing and not self.debug:
                self._silence_ssh()
        except OSError:  # the listener closed under accept(): ssh never came
            if not self._closing:
                raise
        finally:
            self._listener.close()
            if self._end is not None:
                self._end.close()  # ssh sees the connection end (also on errors)

    def _silence_ssh(self) -> None:
        """There is no session, and ssh is starting: end it before it says anything, so
        that the CLI's line is the only one. Left alone, fdpass.py and ssh would each
        complain about the proxy connection ("Connection refused", "proxy dialer did not
        pass back a connection"). Before a session, ssh ends silently on SIGTERM (its
        handler comes with the session), and scp and sftp end theirs silently and exit 1.

        So: take the connection fdpass.py makes, wait for ssh's banner on it (ssh has the
        socket then, and fdpass.py is done), and SIGTERM our one child, the program
        run_session started. It is ours and not yet reaped (subprocess.run waits for it),
        so its pid cannot have been reused. The connection stays open until `close`,
        after ssh is gone: closing it earlier could make ssh report the EOF. When any of
        this fails, ssh gets the EOF at once and says what it says, but never hangs."""
        conn, _ = self._listener.accept()  # until ssh comes, or close() (OSError)
        conn.settimeout(SILENCE_WAIT)
        banner = b""
        try:
            while len(banner) < 4 and (chunk := conn.recv(4 - len(banner))):
                banner += chunk
        except OSError:  # (a timeout): ssh never spoke
            pass
        children = _children() if banner == b"SSH-" else []
        if len(children) != 1:
            conn.close()
            return
        self._held = conn
        self.silenced = True
        os.kill(children[0], signal.SIGTERM)

    def _set_call(self, call: Any) -> None:
        self._call = call
        if self._closing:
            call.cancel()

    def close(self, grace: float = 0.0) -> None:
        """End the session and the thread: wait up to `grace` seconds for the agent to end
        the stream, then cancel it (the agent kills what is left of the session)."""
        if self.removal is not None:
            self.removal.decide(remove=False)   # (unless remove_job came first)
        if self._thread is not None and grace > 0 and self._end is not None:
            self._thread.join(grace)  # (if ssh never connected, there is nothing to end)
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        if self._held is not None:
            self._held.close()

    def remove_job(self, timeout: float | None = None) -> str:
        """-remove-on-interrupt, once interrupted: have the agent end the job, and wait
        for its answer; the line to print. The relay stops reading ssh (which may outlive
        an interrupt that was ours alone, a SIGTERM), so that the stream's last word, after
        ssh's eof, is `remove`."""
        removal = self.removal
        if removal is None:
            return ""
        timeout = REMOVE_TIMEOUT if timeout is None else timeout
        if not removal.granted.is_set():
            return f"Not removed: job {self.job_id}: the session was not open yet"
        removal.decide(remove=True)
        if self._end is not None:
            self._end.close()
        if self._thread is not None:
            self._thread.join(timeout)
        answer = removal.answer
        if answer is None:
            return (f"Not removed: job {self.job_id}: no answer from {self.target} within "
                    f"{timeout:g} s")
        if answer.error:
            return f"Not removed: job {self.job_id}: {answer.error}"
        return f"Removed: job {self.job_id} ended ({answer.killed} processes killed)"


# How long an interrupted ssh-to-job waits for the agent to end the job (-remove-on-
# interrupt): the agent's own wait for the job's processes (10 s) and some.
REMOVE_TIMEOUT = 20.0


class Removal:
    """-remove-on-interrupt's state in one session, shared by the relay's threads and the
    main thread: granted by the agent (`opened`), decided once (remove, or not: ssh
    ended normally), answered by the agent (`removed`)."""

    def __init__(self) -> None:
        self.granted = threading.Event()
        self.decided = threading.Event()
        self.requested = False
        self.answer: pb.ShellRemoved | None = None
        self._lock = threading.Lock()

    def decide(self, *, remove: bool) -> None:
        """The first decision stands: an interrupt after ssh's normal end removes nothing."""
        with self._lock:
            if not self.decided.is_set():
                self.requested = remove
                self.decided.set()

    def last_word(self, finished: threading.Event) -> Iterator[pb.ShellFrame]:
        """What the request stream sends after ssh's eof: `remove` once decided so, or
        nothing (the stream then ends, and with it the session)."""
        while not self.decided.wait(0.5):
            if finished.is_set():
                return
        if self.requested:
            yield pb.ShellFrame(remove=True)


def _interrupted(relay: Relay | None, err: TextIO) -> None:
    """ssh-to-job was interrupted: with -remove-on-interrupt, the job is ended now (one
    line says how that went). A second Ctrl-C stops the wait."""
    if relay is None or relay.removal is None:
        return
    line = relay.remove_job()
    if line:
        err.write(f"{PROG}: {line}\n")
        err.flush()


def _children(procfs: str = "/proc") -> list[int]:
    """The pids of this process's children (a walk of /proc: a moment, on errors only)."""
    me, found = os.getpid(), []
    for entry in os.listdir(procfs):
        if not entry.isdigit():
            continue
        try:
            with open(f"{procfs}/{entry}/stat", "rb") as f:
                # "pid (comm) state ppid ...": comm may hold anything but the last ')'
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # Race: it exited meanwhile
            continue
        if ppid == me:
            found.append(int(entry))
    return found


def relay(*, target: str, job_id: str, pubkey: str, known_hosts: str, alias: str,
          shells: Sequence[str], auth: Authenticator, connect: Callable[[], Any],
          err: TextIO, debug: bool = False, open_timeout: float = OPEN_TIMEOUT,
          on_call: Callable[[Any], None] = lambda call: None,
          local_node: str | None = None, removal: Removal | None = None) -> str:
    """Open the session and relay bytes between it and `connect()`'s end (read, write,
    close_write), which is asked for once the session is open. Returns "" when the
    session ran, else `Category: message`."""

    def fail(category: str, message: str) -> str:
        if debug:
            err.write(f"{PROG}: {category}: {message}\n")
        return f"{category}: {message}"

    try:
        with open(pubkey, encoding="ascii") as f:
            public_key = f.read().strip()
    except OSError as e:
        return fail("Key", f"cannot read {pubkey}: {e.strerror}")
    ready = threading.Event()
    finished = threading.Event()
    end: Any = None

    def requests() -> Iterator[pb.ShellFrame | bytes]:
        yield pb.ShellFrame(open=pb.ShellOpen(job_id=job_id, public_key=public_key,
                                              shells=list(shells),
                                              client=f"{os.uname().nodename} ssh-to-job",
                                              remove_on_interrupt=removal is not None))
        # Nothing from ssh goes out before the session exists and its key is known.
        while not ready.wait(0.5):
            if finished.is_set():
                return
        while True:
            parts = end.read(relaybuf.FRAME)
            if not parts:
                yield pb.ShellFrame(eof=True)
                if removal is not None:
                    yield from removal.last_word(finished)
                return
            yield shellwire.data_frame(parts)

    client = AgentClient(target, auth, local_node=local_node)
    timed_out = threading.Event()
    try:
        call = client.open_job_shell(requests())
        on_call(call)

        def on_timeout() -> None:
            timed_out.set()
            call.cancel()

        timer = threading.Timer(open_timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            first = next(call)
        except StopIteration:
            return fail("Protocol", "the agent ended the stream without opening a session")
        finally:
            timer.cancel()
        if isinstance(first, memoryview) or not first.HasField("opened"):
            call.cancel()
            return fail("Protocol", "the agent's first frame is not `opened`")
        if removal is not None and not first.opened.remove_on_interrupt:
            call.cancel()   # an agent that would not end the job: no session at all
            return fail("Not supported", f"the agent at {target} cannot end job {job_id} "
                                         f"on an interrupt (-remove-on-interrupt)")
        host_key = first.opened.host_key.strip()
        if not host_key:
            call.cancel()
            return fail("Protocol", "the agent sent no host key")
        try:
            fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{alias} {host_key}\n")
        except OSError as e:  # one clear line, not a traceback from the relay's thread
            call.cancel()
            return fail("Known hosts", f"cannot write {known_hosts}: {e.strerror or e}")
        if debug:
            err.write(f"{PROG}: session {first.opened.session_id} on "
                      f"{first.opened.node} as {first.opened.user}\n")
        end = connect()
        ready.set()
        if removal is not None:
            removal.granted.set()
        for frame in call:
            if removal is not None and not isinstance(frame, memoryview) and \
                    frame.HasField("removed"):
                removal.answer = frame.removed
                continue
            data, eof = shellwire.unpack(frame)
            if data:
                try:
                    end.write(data)
                except OSError:  # ssh went away; end the session
                    if removal is not None and removal.requested:
                        continue   # (the answer to `remove` is still to come)
                    call.cancel()
                    return ""
            if eof:
                end.close_write()
        return ""
    except ImpostorError as e:  # whatever answered is not the agent (auth.CredentialPlugin)
        return fail("Authentication failed", str(e))
    except AuthError as e:  # raised by CredentialPlugin when munged cannot encode
        return fail("MUNGE", str(e))
    except grpc.RpcError as e:
        code = e.code()
        if timed_out.is_set():
            return fail("Timeout", f"no session from {target} within {open_timeout:g} s")
        if code == grpc.StatusCode.CANCELLED and end is not None:
            return ""  # we ended it (ssh is done, or Ctrl-C)
        if code == grpc.StatusCode.UNIMPLEMENTED and removal is not None and end is None \
                and (e.details() or "").startswith("-remove-on-interrupt:"):
            return fail("Not supported", e.details() or "")   # its backend ends no job
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return fail("Not supported", f"the agent at {target} has no ssh-to-job")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and end is None:
            # Before `opened`, this is the agent's cap on sessions; its message names it.
            return fail("Too many sessions", e.details() or code.name)
        return fail(CATEGORIES.get(code, "Error"), e.details() or code.name)
    finally:
        finished.set()
        client.close()


# -- entry point --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None, authenticator: Authenticator | None = None) -> int:
    """`ssh-to-job`; tests pass argv, streams and a fake authenticator."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr

    def body() -> int:
        from node_agent.cli import ssh_proxy  # imports this module: not at the top
        if ssh_proxy.wanted(argv):
            return ssh_proxy.main(argv, out, err, authenticator)
        args = parse_args(argv)
        if args.help:
            out.write(USAGE)
            return 0
        if args.version:
            out.write(f"{PROG} {__version__}\n")
            return 0
        cfg = config_mod.find(args.config)
        auth = authenticator or MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
        return run_session(args, cfg, auth, err)

    return run(PROG, body, err)


def entry() -> None:
    """The console script: skips the interpreter's slow teardown (gRPC's threads) once
    everything is flushed."""
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
