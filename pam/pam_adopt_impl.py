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
4. the agent cannot be asked (down, slow past `timeout=`, garbled) ->
   `action_generic_failure`.

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

A denied user sees one sentence (e.g. "Access denied by pam_adopt: you have no active
jobs on this node"); the details go to syslog (authpriv).
"""

# Only C-level modules: pam_python starts a fresh interpreter for every login, and
# `import json` (re, enum, ...) would cost ~15 ms a login, `import socket` ~6 ms.
import _socket
import os
import pwd
import time

DEFAULT_SOCKET = "/run/callerid-adopt/admission.sock"

# name -> (default, allowed values or a parser)
CHOICES = {
    "action_no_jobs": ("deny", ("deny", "ignore")),
    "action_unknown": ("newest", ("newest", "allow", "deny")),
    "action_adopt_failure": ("deny", ("allow", "deny")),
    "action_generic_failure": ("deny", ("ignore", "allow", "deny")),
    "log_level": ("info", ("debug", "info", "error", "quiet")),
}
LEVELS = {"debug": 3, "info": 2, "error": 1, "quiet": 0}

MSG_GENERIC = "Access denied by pam_adopt: the node agent could not be asked"
MSG_GENERIC_DEFAULT = "Access denied by pam_adopt"


# -- a small JSON codec (the subset the admission protocol uses) ------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\b": "\\b", "\f": "\\f"}


def json_dumps(obj: object) -> str:
    """JSON text for dicts, lists, strings, numbers, booleans and None."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, (int, float)):
        return repr(obj)
    if isinstance(obj, str):
        out = []
        for ch in obj:
            esc = _ESCAPES.get(ch)
            if esc is not None:
                out.append(esc)
            elif ch < " ":
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json_dumps(str(k))}: {json_dumps(v)}"
                               for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(json_dumps(v) for v in obj) + "]"
    raise TypeError(f"cannot encode {type(obj).__name__}")


class _Parser:
    _UNESCAPE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
                 "r": "\r", "t": "\t"}

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"bad JSON at {self.i}: {what}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self) -> object:
        self.ws()
        if self.i >= len(self.s):
            raise self.fail("unexpected end")
        c = self.s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c == '"':
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        return self.number()

    def obj(self) -> dict:
        self.i += 1
        out: dict = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            if not self.s.startswith('"', self.i):
                raise self.fail("expected a key")
            key = self.string()
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.fail("expected ':'")
            self.i += 1
            out[key] = self.value()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("}", self.i):
                self.i += 1
                return out
            else:
                raise self.fail("expected ',' or '}'")

    def arr(self) -> list:
        self.i += 1
        out: list = []
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("]", self.i):
                self.i += 1
                return out
            else:
                raise self.fail("expected ',' or ']'")

    def string(self) -> str:
        self.i += 1
        out = []
        s = self.s
        while True:
            j = self.i
            while j < len(s) and s[j] not in '"\\':
                j += 1
            if j >= len(s):
                raise self.fail("unterminated string")
            out.append(s[self.i:j])
            self.i = j + 1
            if s[j] == '"':
                return "".join(out)
            esc = s[self.i:self.i + 1]
            if esc == "u":
                code = self.hex4(self.i + 1)
                self.i += 5
                if 0xD800 <= code < 0xDC00 and s.startswith("\\u", self.i):
                    low = self.hex4(self.i + 2)
                    if 0xDC00 <= low < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        self.i += 6
                out.append(chr(code))
            elif esc in self._UNESCAPE:
                out.append(self._UNESCAPE[esc])
                self.i += 1
            else:
                raise self.fail(f"bad escape {esc!r}")

    def hex4(self, at: int) -> int:
        digits = self.s[at:at + 4]
        if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail("bad \\u escape")
        return int(digits, 16)

    def number(self) -> float | int:
        j = self.i
        while j < len(self.s) and self.s[j] in "+-0123456789.eE":
            j += 1
        text = self.s[self.i:j]
        self.i = j
        try:
            return int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise self.fail(f"bad value {text[:20]!r}") from None


def json_loads(text: str) -> object:
    p = _Parser(text)
    value = p.value()
    p.ws()
    if p.i != len(text):
        raise p.fail("trailing data")
    return value


class Options:
    """Parsed module options with safe defaults (one parser, like pam_slurm_adopt)."""

    def __init__(self) -> None:
        for key, (default, _) in CHOICES.items():
            setattr(self, key, default)
        self.service = "sshd"
        self.socket = DEFAULT_SOCKET
        self.timeout = 5.0
        self.problems: list[str] = []

    @classmethod
    def parse(cls, args: list[str]) -> "Options":
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
                    opts.problems.append("service= is empty; using sshd")
            elif key == "socket":
                if value.startswith("/"):
                    opts.socket = value
                else:
                    opts.problems.append(f"socket={value!r} is not an absolute path; "
                                         f"using {DEFAULT_SOCKET}")
            elif key == "timeout":
                try:
                    t = float(value)
                    if not 0 < t <= 60:
                        raise ValueError
                    opts.timeout = t
                except ValueError:
                    opts.problems.append(f"timeout={value!r} is not a number of seconds "
                                         f"in (0, 60]; using {opts.timeout:g}")
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


# A connection the loader (pam_adopt.py) opened to the default socket before this file
# was even loaded: (path, socket). See take_early().
EARLY = None


def take_early(path: str):
    """The loader's early connection, if it goes to `path` (else it is closed)."""
    global EARLY
    early, EARLY = EARLY, None
    if early is None:
        return None
    if early[0] == path:
        return early[1]
    early[1].close()
    return None


def ask_agent(path: str, request: dict, timeout: float, deadline: float | None = None) -> dict:
    """One request line, one reply line, all within `timeout` seconds (by `deadline`, on
    time.monotonic(), when given: the one the request carries)."""
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
            s.sendall((json_dumps(request) + "\n").encode())
            buf = b""
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                s.settimeout(left)
                chunk = s.recv(65536)
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
        reply = json_loads(buf.split(b"\n", 1)[0].decode("utf-8", "replace"))
    except ValueError:
        raise AgentError(f"garbled answer from the agent at {path}: {buf[:200]!r}") from None
    if not isinstance(reply, dict) or reply.get("decision") not in ("ALLOW", "DENY", "IGNORE"):
        raise AgentError(f"answer without a decision from the agent at {path}: {buf[:200]!r}")
    return reply


def build_request(user: str, service: str, rhost: str, ssh_connection: str,
                  opts: Options, deadline: float) -> dict:
    """The JSON mapping of callerid_adopt.v1.AdmissionRequest (proto field names).

    `deadline`: time.monotonic() when this module stops waiting. CLOCK_MONOTONIC is one
    clock for every process of the machine, so the agent can tell a request it reads
    late (stopped, or busy) from a fresh one, and drop it instead of adopting a process
    that has given up, or a new process that got its pid."""
    return {
        "user": user,
        "service": service,
        "rhost": rhost,
        "ssh_connection": ssh_connection,
        "options": {
            "action_no_jobs": opts.action_no_jobs,
            "action_unknown": opts.action_unknown,
            "action_adopt_failure": opts.action_adopt_failure,
            "timeout": opts.timeout,
        },
        "deadline": deadline,
    }


def _tell(pamh, flags: int, text: str) -> None:
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


def _generic_failure(pamh, flags: int, opts: Options, log: Log, why: str) -> int:
    action = opts.action_generic_failure
    log.error(f"{why}; action_generic_failure={action}")
    if action == "ignore":
        return pamh.PAM_IGNORE
    if action == "allow":
        return pamh.PAM_SUCCESS
    _tell(pamh, flags, MSG_GENERIC)
    return pamh.PAM_PERM_DENIED


def acct_mgmt(pamh, flags: int, argv: list[str]) -> int:
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
    try:
        reply = ask_agent(opts.socket, request, opts.timeout, deadline)
    except AgentError as e:
        # 4. the agent could not be asked.
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
    if decision == "ALLOW":
        log.info(summary)
        for key, value in (reply.get("env") or {}).items():
            try:
                pamh.env[key] = value
            except Exception as e:
                log.error(f"cannot export {key}: {e}")
        return pamh.PAM_SUCCESS
    if decision == "IGNORE":
        log.info(summary)
        return pamh.PAM_IGNORE
    log.info(summary)
    _tell(pamh, flags, reply.get("message") or MSG_GENERIC_DEFAULT)
    return pamh.PAM_PERM_DENIED


def pam_sm_acct_mgmt(pamh, flags, argv):
    try:
        return acct_mgmt(pamh, flags, argv)
    except Exception as e:  # never let a bug turn into an open door: deny
        Log("error").error(f"internal error: {type(e).__name__}: {e}")
        return pamh.PAM_SYSTEM_ERR
    finally:
        take_early("")  # unused (root, another service, another socket): close it


def _not_ours(pamh, flags, argv):
    return pamh.PAM_IGNORE


# pam_adopt is an account module; in any other stack it stays out of the way.
pam_sm_authenticate = _not_ours
pam_sm_setcred = _not_ours
pam_sm_open_session = _not_ours
pam_sm_close_session = _not_ours
pam_sm_chauthtok = _not_ours
