"""pam_adopt's logic: admit an ssh login only for a user with a job here, and put it in
that job.

pam_python loads pam/pam_adopt.py, which loads this file with its bytecode cached (see
there why). The account-phase PAM module of callerid-adopt:

    -account  required  /lib/security/pam_python.so /opt/callerid-adopt/pam/pam_adopt.py [options]

It imports nothing but the standard library and never gRPC (the
interpreter starts for every login, `import grpc` alone would cost ~100 ms, and gRPC is
not fork-safe while sshd forks after PAM). It sends one request to the local node agent
over a root-only Unix socket and applies the reply. The request carries the moment this
module stops waiting (its deadline, on the machine's CLOCK_MONOTONIC), and the module
closes the connection when it gives up: the agent acts on nothing after either. The
agent does the work: it finds the user's jobs on this node, asks the source node's agent
which job owns the ssh connection when there are several, and moves this process (sshd's
privileged process for the login, which the agent identifies with SO_PEERCRED) into that
job's cgroups.

Decision order (pam_slurm_adopt's, with failure defaults that deny):

1. root is ignored (PAM_IGNORE) before anything else can fail;
2. a PAM service other than `service=` (default sshd) is ignored;
3. the agent answers: no jobs here -> `action_no_jobs`; one job -> adopted; several ->
   the job that owns the connection on the source node, else `action_unknown`;
   adoption failing -> `action_adopt_failure`;
4. adopted: the job's namespaces that the agent sent with its answer (see below) are
   entered; failing that -> `action_adopt_failure` too;
5. the agent cannot be asked (down, slow past `timeout=`, garbled, or of another
   callerid-adopt version: "version mismatch" in syslog) -> `action_generic_failure`.

Options (`key=value`; a bad value is logged and replaced by its default, an unknown key
is logged and ignored):

    action_no_jobs=deny|ignore              default deny
    action_unknown=newest|allow|deny        default newest
    action_adopt_failure=allow|deny         default deny
    action_generic_failure=ignore|allow|deny  default deny
    service=NAME|*                          default sshd
    log_level=debug|info|error|quiet        default info
    socket=PATH                             default /run/callerid-adopt/admission.sock
    timeout=SECONDS                         default 5
    nodename=NAME                           default (the agent's node)
    disable_x11=0|1                         default 0
    join_container=true|false               default true

`nodename=` names the node this PAM line is for (pam_slurm_adopt's, where the node's
Slurm NodeName is not its host name): the agent refuses a login for another node than
its own, saying so in its log. `disable_x11=` is accepted for pam_slurm_adopt's lines
and changes nothing: pam_adopt sets up no X11 forwarding (pam_slurm_adopt's is for
`srun --x11` jobs). `join_container=false` keeps a login out of the job's namespaces.

The job's namespaces (pam_slurm_adopt's `join_container`). A job can live in namespaces
of its own: Slurm's job_container/tmpfs gives it a private /tmp (a mount namespace), and a
native job may make its own. Only a process can enter a namespace itself (setns), so the
agent sends this module the job's namespace fds with its answer (SCM_RIGHTS on the
admission socket: only to root, the socket's only callers) and this module enters them,
in the order the answer names them, never a user namespace (entering one would drop
root's powers over the node that sshd still needs). sshd forks the session after the
account stack: the session, and everything it starts, is then in the job's namespaces.
A login without such a job costs nothing more (`ctypes` is imported only to enter a
namespace, on Pythons without os.setns). Every fd received is closed before this module
returns, whatever happens; one this module did not ask for is closed and logged. A
namespace that cannot be entered is an adoption failure, as for pam_slurm_adopt.

A denied user sees one sentence (e.g. "Access denied by pam_adopt: you have no active
jobs on this node"); the details go to syslog (authpriv).

The contract with the agent (these options and defaults, the socket, the sentences, and
the wire format: lines of `key=value` after `protocol=2`, an empty line at the end) is
defined in node_agent/pamcontract.py. This file cannot import it and keeps copies, which
tests/unit/test_pam_module.py checks against it.
"""

# Only C-level modules: pam_python starts a fresh interpreter for every login, and
# `import json` (re, enum, ...) would cost ~15 ms a login, `import socket` ~6 ms. The
# annotations Python evaluates (signatures, module level) are strings, and `typing` is
# imported for the type checker only.
import _socket
import os
import pwd
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, MutableMapping
    from typing import Protocol

    class PamHandle(Protocol):
        """What this module uses of pam_python's handle."""

        PAM_SUCCESS: int
        PAM_SYSTEM_ERR: int
        PAM_PERM_DENIED: int
        PAM_IGNORE: int
        PAM_ERROR_MSG: int
        user: str | None
        rhost: str | None
        service: str | None
        env: MutableMapping[str, str]

        def get_user(self, prompt: str | None) -> str | None: ...
        def Message(self, style: int, text: str) -> object: ...  # pam_python's name
        def conversation(self, msg: object) -> object: ...

# -- copies of node_agent/pamcontract.py (this file cannot import the package; -------------
#    tests/unit/test_pam_module.py checks that they are equal) ---------------------------

DEFAULT_SOCKET = "/run/callerid-adopt/admission.sock"
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 60.0
DEFAULT_SERVICE = "sshd"
# name -> (default, allowed values)
CHOICES = {
    "action_no_jobs": ("deny", ("deny", "ignore")),
    "action_unknown": ("newest", ("newest", "allow", "deny")),
    "action_adopt_failure": ("deny", ("allow", "deny")),
    "action_generic_failure": ("deny", ("ignore", "allow", "deny")),
    "log_level": ("info", ("debug", "info", "error", "quiet")),
    "disable_x11": ("0", ("0", "1")),
    "join_container": ("true", ("true", "false")),
}
AGENT_OPTIONS = ("action_no_jobs", "action_unknown", "action_adopt_failure")
MSG_GENERIC = "Access denied by pam_adopt: the node agent could not be asked"
MSG_GENERIC_DEFAULT = "Access denied by pam_adopt"
MSG_ADOPT_FAILED = "Access denied by pam_adopt: your session could not be added to your job"
PROTOCOL_LINE = "protocol=2"
REPLY_KEYS = ("decision", "reason", "message", "job_id", "detail", "env", "namespaces")
DECISIONS = ("ALLOW", "DENY", "IGNORE")
# -- and of node_agent/jobenv.py: the namespaces a login may enter, with their <sched.h>
#    CLONE_NEW* flags (setns checks that an fd is of the kind it claims to be)
JOIN_KINDS = ("cgroup", "ipc", "uts", "net", "pid", "mnt", "time")
CLONE_FLAGS = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000,
               "ipc": 0x08000000, "user": 0x10000000, "pid": 0x20000000,
               "net": 0x40000000, "time": 0x00000080}
MAX_FDS = len(CLONE_FLAGS)  # room for one fd of every kind; more is cut off (and closed)

LEVELS = {"debug": 3, "info": 2, "error": 1, "quiet": 0}


# -- the wire format: lines of key=value, escaped (pamcontract's docstring) ---------------

def encode(pairs: "list[tuple[str, str]]") -> bytes:
    """The request: `protocol=2`, one `key=value` line per pair, an empty line. In a
    value a backslash travels as two, a line feed as backslash + n."""
    lines = [PROTOCOL_LINE]
    for key, value in pairs:
        if value:  # an empty value is left out: it means the same
            lines.append(key + "=" + value.replace("\\", "\\\\").replace("\n", "\\n"))
    return ("\n".join(lines) + "\n\n").encode()


class GarbledAnswer(ValueError):
    """An answer this module cannot read; `mismatch` when it is in another protocol."""

    def __init__(self, why: str, mismatch: bool = False) -> None:
        super().__init__(why)
        self.mismatch = mismatch


def decode_reply(data: bytes) -> "tuple[dict[str, str], list[tuple[str, str]]]":
    """The agent's reply -> (its fields, its env pairs in order). Raises GarbledAnswer."""
    text = data.decode("utf-8", "replace")
    first = text.partition("\n")[0]
    if first != PROTOCOL_LINE:
        if first.startswith(("{", "protocol=", "version mismatch")):
            raise GarbledAnswer(f"not in admission {PROTOCOL_LINE}", mismatch=True)
        raise GarbledAnswer("no protocol line")
    body, end, rest = text.partition("\n\n")
    if not end or rest:
        raise GarbledAnswer("no end, or more after it")
    fields: dict[str, str] = {}
    env: list[tuple[str, str]] = []
    for line in body.split("\n")[1:]:
        key, eq, value = line.partition("=")
        if not eq or key not in REPLY_KEYS or (key in fields and key != "env"):
            raise GarbledAnswer(f"bad line {line[:60]!r}")
        value = "\\".join(part.replace("\\n", "\n") for part in value.split("\\\\"))
        if key == "env":
            name, eq, value = value.partition("=")
            if not name or not eq:
                raise GarbledAnswer(f"bad line {line[:60]!r}")
            env.append((name, value))
        else:
            fields[key] = value
    if fields.get("decision") not in DECISIONS:
        raise GarbledAnswer("no decision")
    return fields, env


class Options:
    """Parsed module options with safe defaults (one parser, like pam_slurm_adopt)."""

    def __init__(self) -> None:
        self.action_no_jobs = CHOICES["action_no_jobs"][0]
        self.action_unknown = CHOICES["action_unknown"][0]
        self.action_adopt_failure = CHOICES["action_adopt_failure"][0]
        self.action_generic_failure = CHOICES["action_generic_failure"][0]
        self.log_level = CHOICES["log_level"][0]
        self.service = DEFAULT_SERVICE
        self.socket = DEFAULT_SOCKET
        self.timeout = DEFAULT_TIMEOUT
        self.nodename = ""
        self.disable_x11 = CHOICES["disable_x11"][0]
        self.join_container = CHOICES["join_container"][0]
        self.problems: list[str] = []

    @classmethod
    def parse(cls, args: "list[str]") -> "Options":
        opts = cls()
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                opts.problems.append(f"ignoring option {arg!r}: expected key=value")
                continue
            if key in CHOICES:
                default, allowed = CHOICES[key]
                if value in allowed:
                    setattr(opts, key, value)
                else:
                    opts.problems.append(f"{key}={value!r} is not one of "
                                         f"{'|'.join(allowed)}; using {default}")
            elif key == "service":
                if value:
                    opts.service = value
                else:
                    opts.problems.append(f"service= is empty; using {DEFAULT_SERVICE}")
            elif key == "nodename":
                if value and not any(c.isspace() or c in "=\\" for c in value):
                    opts.nodename = value
                else:
                    opts.problems.append(f"nodename={value!r} is not a node name; "
                                         "using the agent's")
            elif key == "socket":
                if value.startswith("/"):
                    opts.socket = value
                else:
                    opts.problems.append(f"socket={value!r} is not an absolute path; "
                                         f"using {DEFAULT_SOCKET}")
            elif key == "timeout":
                try:
                    t = float(value)
                    if not 0 < t <= MAX_TIMEOUT:
                        raise ValueError
                    opts.timeout = t
                except ValueError:
                    opts.problems.append(f"timeout={value!r} is not a number of seconds "
                                         f"in (0, {MAX_TIMEOUT:g}]; using {opts.timeout:g}")
            else:
                opts.problems.append(f"ignoring unknown option {key!r}")
        return opts


class Log:
    """syslog (authpriv), filtered by log_level.

    Written straight to /dev/log with a datagram socket, not with the syslog module:
    openlog() would change the ident of the whole sshd process, and every later line of
    pam_unix or sshd would carry ours.
    """

    FACILITY = 10 << 3  # LOG_AUTHPRIV

    def __init__(self, level: str, path: str = "/dev/log") -> None:
        self.level = LEVELS.get(level, 2)
        self.path = path

    def _send(self, severity: int, msg: str) -> None:
        line = f"<{self.FACILITY | severity}>pam_adopt[{os.getpid()}]: {msg}"
        try:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            try:
                s.settimeout(0.2)
                s.sendto(line.encode(errors="replace")[:8000], self.path)
            finally:
                s.close()
        except OSError:
            pass  # no syslog daemon: nothing to keep the line, and never a reason to fail

    def debug(self, msg: str) -> None:
        if self.level >= 3:
            self._send(7, msg)

    def info(self, msg: str) -> None:
        if self.level >= 2:
            self._send(6, msg)

    def error(self, msg: str) -> None:
        if self.level >= 1:
            self._send(3, msg)


class AgentError(Exception):
    """The agent could not be asked, or its answer made no sense."""


class Received:
    """The fds that came with the agent's answer (SCM_RIGHTS), in their order; whoever
    made this closes them (close()), in every path."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.truncated = False  # more came than there was room for: the kernel closed them

    def take(self, ancdata: "list[tuple[int, int, bytes]]", flags: int) -> None:
        for level, kind, data in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                self.fds += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
                             for i in range(0, len(data) - len(data) % 4, 4)]
        if flags & getattr(_socket, "MSG_CTRUNC", 8):
            self.truncated = True

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


_libc_setns: "Callable[[int, int], int] | None" = None


def setns(fd: int, flag: int) -> None:
    """setns(2): os.setns (Python 3.12), else libc's through ctypes, imported only here:
    `import ctypes` costs milliseconds, and most logins enter no namespace."""
    global _libc_setns
    fn = getattr(os, "setns", None)
    if fn is not None:
        fn(fd, flag)
        return
    import ctypes

    if _libc_setns is None:
        _libc_setns = ctypes.CDLL(None, use_errno=True).setns
    if _libc_setns(fd, flag) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def join_namespaces(kinds: "list[str]", received: Received) -> "list[str]":
    """Enter the namespaces `kinds` names, one fd of `received` each, in that order; the
    kinds entered. Raises OSError (with what was entered before) when one cannot be."""
    if received.truncated or len(kinds) != len(received.fds):
        raise OSError(f"{len(received.fds)} namespace fds for {','.join(kinds) or 'none'}"
                      + (" (cut off)" if received.truncated else ""))
    bad = [k for k in kinds if k not in JOIN_KINDS]
    if bad:  # never "user" (see the docstring), nor a kind this module does not know
        raise OSError(f"will not enter {','.join(bad)} namespaces")
    entered: list[str] = []
    for kind, fd in zip(kinds, received.fds, strict=True):
        try:
            setns(fd, CLONE_FLAGS[kind])
        except OSError as e:
            raise OSError(e.errno, f"setns {kind}: {e.strerror or e}"
                          + (f" (entered {','.join(entered)})" if entered else "")) from None
        entered.append(kind)
    return entered


# A connection the loader (pam_adopt.py) opened to the default socket before this file
# was even loaded: (path, socket). See take_early().
EARLY: "tuple[str, _socket.socket] | None" = None


def take_early(path: str) -> "_socket.socket | None":
    """The loader's early connection, if it goes to `path` (else it is closed)."""
    global EARLY
    early, EARLY = EARLY, None
    if early is None:
        return None
    if early[0] == path:
        return early[1]
    early[1].close()
    return None


def ask_agent(path: str, request: bytes, timeout: float, deadline: "float | None" = None,
              received: "Received | None" = None,
              ) -> "tuple[dict[str, str], list[tuple[str, str]]]":
    """Send the request, read the reply (decode_reply's), all within `timeout` seconds
    (by `deadline`, on time.monotonic(), when given: the one the request carries). Fds
    that come with it go to `received` (closed here when there is none)."""
    if received is None:
        received = Received()
        try:
            return ask_agent(path, request, timeout, deadline, received)
        finally:
            received.close()
    if deadline is None:
        deadline = time.monotonic() + timeout
    s = take_early(path)
    connected = s is not None
    if s is None:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            s.settimeout(left)
            if not connected:
                s.connect(path)
            s.sendall(request)
            # Up to the reply's empty line, or the end of the connection (the agent closes
            # after its reply; an agent of another version may answer with one line).
            buf = b""
            while b"\n\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                s.settimeout(left)
                # recvmsg, not recv: fds sent with the reply would be closed by the kernel
                # if read without room for them (MSG_CMSG_CLOEXEC: never into an exec).
                chunk, ancdata, flags, _ = s.recvmsg(
                    65536, _socket.CMSG_SPACE(MAX_FDS * 4), _socket.MSG_CMSG_CLOEXEC)
                received.take(ancdata, flags)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise AgentError(
                f"no answer from the agent at {path} within {timeout:g} s") from None
        except OSError as e:
            raise AgentError(f"cannot reach the agent at {path}: {e.strerror or e}") from None
    finally:
        # Closing is how the agent learns that we gave up: it then adopts nothing.
        s.close()
    if not buf:
        raise AgentError(f"the agent at {path} closed the connection without an answer")
    try:
        return decode_reply(buf)
    except GarbledAnswer as e:
        if e.mismatch:
            raise AgentError(
                f"version mismatch: the agent at {path} does not answer in admission "
                f"{PROTOCOL_LINE}, this module's (the agent and pam_adopt are of different "
                f"callerid-adopt versions: restart the agent, or install its module): "
                f"{buf[:200]!r}") from None
        raise AgentError(f"garbled answer from the agent at {path} ({e}): "
                         f"{buf[:200]!r}") from None


def build_request(user: str, service: str, rhost: str, ssh_connection: str,
                  opts: Options, deadline: float) -> bytes:
    """The request (pamcontract.Request's fields, in its order).

    `deadline`: time.monotonic() when this module stops waiting. CLOCK_MONOTONIC is one
    clock for every process of the machine, so the agent can tell a request it reads
    late (stopped, or busy) from a fresh one, and drop it instead of adopting a process
    that has given up, or a new process that got its pid."""
    return encode([
        ("user", user),
        ("service", service),
        ("rhost", rhost),
        ("ssh_connection", ssh_connection),
        ("action_no_jobs", opts.action_no_jobs),
        ("action_unknown", opts.action_unknown),
        ("action_adopt_failure", opts.action_adopt_failure),
        ("join_container", opts.join_container),
        ("nodename", opts.nodename),
        ("timeout", repr(opts.timeout)),
        ("deadline", repr(deadline)),
    ])


def _tell(pamh: "PamHandle", flags: int, text: str) -> None:
    """One sentence to the user, unless the application asked for silence."""
    if not text or flags & getattr(pamh, "PAM_SILENT", 0x8000):
        return
    try:
        pamh.conversation(pamh.Message(pamh.PAM_ERROR_MSG, text))
    except Exception:  # pam_python raises pamh.exception when there is no conversation
        pass


def _is_root(user: str) -> bool:
    if user == "root":
        return True
    try:
        return pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False


def _generic_failure(pamh: "PamHandle", flags: int, opts: Options, log: Log, why: str) -> int:
    action = opts.action_generic_failure
    log.error(f"{why}; action_generic_failure={action}")
    if action == "ignore":
        return pamh.PAM_IGNORE
    if action == "allow":
        return pamh.PAM_SUCCESS
    _tell(pamh, flags, MSG_GENERIC)
    return pamh.PAM_PERM_DENIED


def acct_mgmt(pamh: "PamHandle", flags: int, argv: "list[str]") -> int:
    """The decision order of the module docstring."""
    # 1. root first, before anything that can fail.
    try:
        user = pamh.get_user(None)
    except Exception:
        user = getattr(pamh, "user", None)
    if user and _is_root(user):
        return pamh.PAM_IGNORE
    opts = Options.parse(list(argv[1:]))
    log = Log(opts.log_level)
    for problem in opts.problems:
        log.error(problem)
    if not user:
        return _generic_failure(pamh, flags, opts, log, "no user name")
    # 2. other services are not ours.
    service = pamh.service or ""
    if opts.service != "*" and service != opts.service:
        log.debug(f"service {service!r} is not {opts.service!r}: ignored")
        return pamh.PAM_IGNORE
    # 3. ask the agent.
    try:
        ssh_connection = pamh.env.get("SSH_CONNECTION") or os.environ.get("SSH_CONNECTION", "")
    except Exception:
        ssh_connection = ""
    t_ask = time.monotonic()
    deadline = t_ask + opts.timeout
    request = build_request(user, service, pamh.rhost or "", ssh_connection or "", opts,
                            deadline)
    received = Received()
    try:
        return _decided(pamh, flags, opts, log, user, request, deadline, t_ask,
                        ssh_connection, received)
    finally:
        received.close()  # before sshd forks the session: no fd of ours reaches it


def _decided(pamh: "PamHandle", flags: int, opts: Options, log: Log, user: str,
             request: bytes, deadline: float, t_ask: float, ssh_connection: str,
             received: Received) -> int:
    """Steps 3-5 of the decision order: the agent's answer, applied."""
    try:
        reply, env = ask_agent(opts.socket, request, opts.timeout, deadline, received)
    except AgentError as e:
        # 5. the agent could not be asked.
        took = (time.monotonic() - t_ask) * 1000
        return _generic_failure(pamh, flags, opts, log, f"{user}: {e} (after {took:.0f} ms)")
    took = (time.monotonic() - t_ask) * 1000
    decision = reply["decision"]
    reason = reply.get("reason", "")
    job = reply.get("job_id", "")
    detail = reply.get("detail", "")
    summary = (f"{user} from {pamh.rhost or '?'} ({ssh_connection or 'no SSH_CONNECTION'}): "
               f"{decision.lower()} ({reason}{', job ' + job if job else ''})"
               f"{': ' + detail if detail else ''}; answered in {took:.0f} ms")
    kinds = [k for k in reply.get("namespaces", "").split(",") if k]
    asked = opts.join_container == "true"
    unasked = not (decision == "ALLOW" and job and asked)
    if (received.fds or kinds) and (unasked or not kinds):
        log.error(f"{user}: the agent sent {len(received.fds)} fds "
                  f"({','.join(kinds) or 'unnamed'}) with a {decision.lower()} answer"
                  f"{' unasked (join_container=false)' if not asked else ''}: closed, unused")
        received.close()
        kinds = []
    if decision == "ALLOW" and kinds:
        # 4. the job's namespaces.
        try:
            entered = join_namespaces(kinds, received)
        except OSError as e:
            why = f"cannot enter job {job}'s namespaces: {e.strerror or e}"
            action = opts.action_adopt_failure
            log.error(f"{summary}; {why}; action_adopt_failure={action}")
            if action == "allow":
                _export(pamh, env, log)
                return pamh.PAM_SUCCESS
            _tell(pamh, flags, MSG_ADOPT_FAILED)
            return pamh.PAM_PERM_DENIED
        summary += f"; entered its {','.join(entered)} namespaces"
    if decision == "ALLOW":
        log.info(summary)
        _export(pamh, env, log)
        return pamh.PAM_SUCCESS
    if decision == "IGNORE":
        log.info(summary)
        return pamh.PAM_IGNORE
    log.info(summary)
    _tell(pamh, flags, reply.get("message") or MSG_GENERIC_DEFAULT)
    return pamh.PAM_PERM_DENIED


def _export(pamh: "PamHandle", env: "list[tuple[str, str]]", log: Log) -> None:
    """The job's environment variables, into the session's (pam_putenv)."""
    for key, value in env:
        try:
            pamh.env[key] = value
        except Exception as e:
            log.error(f"cannot export {key}: {e}")


def pam_sm_acct_mgmt(pamh: "PamHandle", flags: int, argv: "list[str]") -> int:
    try:
        return acct_mgmt(pamh, flags, argv)
    except Exception as e:  # never let a bug turn into an open door: deny
        Log("error").error(f"internal error: {type(e).__name__}: {e}")
        return pamh.PAM_SYSTEM_ERR
    finally:
        take_early("")  # unused (root, another service, another socket): close it


def _not_ours(pamh: "PamHandle", flags: int, argv: "list[str]") -> int:
    return pamh.PAM_IGNORE


# pam_adopt is an account module; in any other stack it stays out of the way.
pam_sm_authenticate = _not_ours
pam_sm_setcred = _not_ours
pam_sm_open_session = _not_ours
pam_sm_close_session = _not_ours
pam_sm_chauthtok = _not_ours
