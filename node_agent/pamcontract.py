"""The contract between pam_adopt (the PAM module) and the agent, defined once.

The PAM module (`pam/pam_adopt.py`, which loads `pam/pam_adopt_impl.py`) runs in a fresh
interpreter at every login and imports only C-level or already-loaded modules of the
standard library, so it cannot import this package. It keeps copies of what it needs
from here; `tests/unit/test_pam_module.py` loads it from its files and checks that every
copy equals this definition, and that each side reads what the other writes.

What is defined here: the module's options (names, allowed values, defaults), the
admission socket's path, the module's default and largest `timeout=`, the sentences a
denied user can see, and the wire format of the admission socket.

The wire format (admission protocol 2)
--------------------------------------

One request from the module, then one reply from the agent, on a fresh connection to the
root-only Unix socket. Each is UTF-8 text: lines of `key=value`, the first line
`protocol=2`, an empty line at the end. A request, then its reply::

    protocol=2
    user=alice
    service=sshd
    rhost=10.0.0.1
    ssh_connection=10.0.0.1 40000 10.0.0.2 22
    action_no_jobs=deny
    action_unknown=newest
    action_adopt_failure=deny
    join_container=true
    timeout=5.0
    deadline=81236.512804
    (empty line)

    protocol=2
    decision=ALLOW
    reason=one-job
    job_id=42
    detail=adopt 0.3 ms
    namespaces=mnt
    env=CALLERID_JOB_ID=42
    env=CALLERID_NODE=node2
    (empty line)

- Keys are the names of the fields of `Request` and `Reply` below; a key appears at most
  once, except `env` (one line per variable: `env=NAME=VALUE`). A key that is not listed
  is an error, and so is a line without `=`. A missing key means its empty value (the
  sender leaves empty values out).
- A value is everything after the first `=`. Two characters are escaped in it, nothing
  else: a backslash is sent as two backslashes, a line feed as backslash + `n`. So a
  value never holds a line feed, and the empty line can only be the end.
- Numbers (`timeout`, `deadline`) are Python's `repr()` of a float: every digit kept.
- The job's namespaces travel with the reply: when the request says `join_container=true`
  and the reply adopts (decision ALLOW with a job_id), the agent sends the reply's bytes
  in one sendmsg() with an SCM_RIGHTS message of one fd per namespace the job has and the
  agent has not, and `namespaces=` names their kinds in the order of the fds (and of
  entering them: node_agent.jobenv.JOIN_KINDS; never `user`). No other reply carries an
  fd. The module enters them with setns() and closes every fd it receives.
- The reader splits with the standard library alone (`str.split`, `str.partition`):
  the module needs no parser, and `import json` would cost ~8 ms in every login.

Versions. Before this format (callerid-adopt 0.2.0 and earlier) the module and the
agent sent one line of JSON each. Neither side guesses at a message in another protocol
(a first line that is JSON, or another `protocol=`):

- the agent answers `VERSION_MISMATCH_ANSWER` (one line, no reply in any version: an
  older module logs it as a garbled answer, with its text, and applies
  `action_generic_failure`) and logs the mismatch;
- the module logs `version mismatch: ...` (for an older agent's JSON answer, or this
  one) and applies `action_generic_failure`.

The agent reads a request only up to its first line feed when that line is not
`protocol=2`, and an older agent reads one line, so a mismatch is answered at once
instead of after the module's timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Final, Literal, TypeAlias, get_args

# -- what pam_adopt accepts -------------------------------------------------------------

#: The agent's admission socket: `admission_socket` in agent.toml, `socket=` of the module.
DEFAULT_SOCKET: Final = "/run/callerid-adopt/admission.sock"
#: The module's `timeout=` (seconds): the whole exchange with the agent.
DEFAULT_TIMEOUT: Final = 5.0
#: `timeout=` takes a number of seconds in (0, MAX_TIMEOUT].
MAX_TIMEOUT: Final = 60.0
#: The module's `service=`: logins of other PAM services are ignored (`*`: none are).
DEFAULT_SERVICE: Final = "sshd"

#: Options that take one of a few words: name -> (default, allowed values).
#: pam_slurm_adopt's vocabulary, with failure defaults that deny.
CHOICES: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "action_no_jobs": ("deny", ("deny", "ignore")),
    "action_unknown": ("newest", ("newest", "allow", "deny")),
    "action_adopt_failure": ("deny", ("allow", "deny")),
    "action_generic_failure": ("deny", ("ignore", "allow", "deny")),
    "log_level": ("info", ("debug", "info", "error", "quiet")),
    # pam_slurm_adopt's: accepted, nothing to do (pam_adopt sets up no X11 forwarding)
    "disable_x11": ("0", ("0", "1")),
    # enter the job's namespaces (job_container/tmpfs's private /tmp, a native job's own)
    "join_container": ("true", ("true", "false")),
}
#: Every option of the module, in the order the documentation lists them.
OPTIONS: Final = ("action_no_jobs", "action_unknown", "action_adopt_failure",
                  "action_generic_failure", "service", "log_level", "socket", "timeout",
                  "nodename", "disable_x11", "join_container")
#: The actions the module passes on to the agent (with `timeout`): the agent applies them,
#: an empty one as its default. The module also sends `nodename` and `join_container`.
AGENT_OPTIONS: Final = ("action_no_jobs", "action_unknown", "action_adopt_failure")

# -- what a denied user sees: one sentence (the details go to syslog) -----------------

_DENIED = "Access denied by pam_adopt"
MSG_NO_JOBS: Final = f"{_DENIED}: you have no active jobs on this node"
MSG_UNKNOWN: Final = (f"{_DENIED}: this connection does not come from one of your jobs "
                      "on this node")
#: The agent's when adoption fails; the module's too, when it cannot enter the job's
#: namespaces (both with action_adopt_failure=deny).
MSG_ADOPT_FAILED: Final = f"{_DENIED}: your session could not be added to your job"
MSG_BAD_REQUEST: Final = f"{_DENIED}: internal error"
MSG_BUSY: Final = (f"{_DENIED}: too many of your logins are waiting on this node; "
                   "try again later")
#: The module's own, when it cannot ask the agent (action_generic_failure=deny).
MSG_GENERIC: Final = f"{_DENIED}: the node agent could not be asked"
#: The module's, for a denial that came without a message.
MSG_GENERIC_DEFAULT: Final = _DENIED

# -- the wire format (see the module docstring) ----------------------------------------

PROTOCOL: Final = 2
PROTOCOL_LINE: Final = f"protocol={PROTOCOL}"
#: The agent's whole answer to a request that is not in its protocol.
VERSION_MISMATCH_ANSWER: Final = (
    f"version mismatch: this agent speaks admission protocol {PROTOCOL} and the pam_adopt "
    "module does not: install the module of the agent's callerid-adopt version\n").encode()

Decision: TypeAlias = Literal["ALLOW", "DENY", "IGNORE"]
ALLOW: Final[Decision] = "ALLOW"  # PAM_SUCCESS (adopted into job_id, or admitted without)
DENY: Final[Decision] = "DENY"  # PAM_PERM_DENIED; `message` is shown to the user
IGNORE: Final[Decision] = "IGNORE"  # PAM_IGNORE
DECISIONS: Final[tuple[Decision, ...]] = get_args(Decision)


class WireError(ValueError):
    """A message that does not follow the wire format."""


class VersionMismatch(WireError):
    """A message in another protocol than ours (the other side has another version)."""


@dataclass(frozen=True)
class Request:
    """What the module asks. Empty options mean their defaults."""

    user: str = ""
    service: str = ""  # the PAM service name
    rhost: str = ""  # PAM_RHOST
    # OpenSSH's SSH_CONNECTION: "src_ip src_port dst_ip dst_port" (client first). Empty
    # when the login has none; then only a user with exactly one job is adopted.
    ssh_connection: str = ""
    action_no_jobs: str = ""
    action_unknown: str = ""
    action_adopt_failure: str = ""
    # "true": the module takes the job's namespaces with an adopting reply and enters
    # them. Anything else, empty included (a request typed by hand), gets no fd.
    join_container: str = ""
    # The module's nodename=: the node it means. Empty: this agent's. Another name is
    # refused (the agent serves one node: a PAM line meant for another is a mistake).
    nodename: str = ""
    timeout: float = 0.0  # the module's timeout=, seconds
    # When the module stops waiting: CLOCK_MONOTONIC seconds (time.monotonic()), its start
    # of the exchange plus its timeout. One clock for the whole machine (unless the module
    # runs in another time namespace, which the agent checks), so the agent can tell a
    # request it reads late from a fresh one. 0: none (the agent counts the timeout from
    # when it read the request).
    deadline: float = 0.0


@dataclass(frozen=True)
class Reply:
    """What the agent answers."""

    decision: Decision
    # Why, for logs, metrics and tests: "one-job", "caller-id", "unknown-newest",
    # "unknown-allow", "unknown-deny", "no-jobs", "adopt-failed", "bad-request", ...
    reason: str = ""
    message: str = ""  # one sentence for the user (DENY)
    job_id: str = ""  # the job the session was adopted into, if any
    detail: str = ""  # a longer explanation, for the log
    env: Mapping[str, str] = field(default_factory=dict)  # exported with pam_putenv
    # The kinds of the namespace fds sent with this reply, in their order ("mnt", ...):
    # `namespaces=mnt,net` on the wire.
    namespaces: tuple[str, ...] = ()


REQUEST_KEYS: Final = tuple(f.name for f in fields(Request))
REPLY_KEYS: Final = tuple(f.name for f in fields(Reply))
_NUMBERS = frozenset(f.name for f in fields(Request) if f.type == "float")


def escape(value: str) -> str:
    r"""A value as it travels: ``a\b`` + line feed -> ``a\\b\n``."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def unescape(text: str) -> str:
    r"""The inverse of escape(): split at escaped backslashes first, so that ``\\n`` is a
    backslash and an ``n``, never a line feed."""
    return "\\".join(part.replace("\\n", "\n") for part in text.split("\\\\"))


def _encode(pairs: Iterable[tuple[str, str]]) -> bytes:
    """The message of `pairs`; an empty value is left out (it means the same)."""
    lines = [PROTOCOL_LINE, *(f"{key}={escape(value)}" for key, value in pairs if value)]
    return ("\n".join(lines) + "\n\n").encode()


def complete(data: bytes) -> bool:
    """Whether `data` holds a whole message to read: up to its empty line, or (another
    protocol) a first line that is not ours, which is answered without waiting for more."""
    if b"\n\n" in data:
        return True
    first, newline, _ = data.partition(b"\n")
    return bool(newline) and first != PROTOCOL_LINE.encode()


def _decode(data: bytes, keys: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    text = data.decode("utf-8", "replace")
    first = text.partition("\n")[0]
    if first != PROTOCOL_LINE:
        if first.startswith("{"):
            raise VersionMismatch(f"version mismatch: a {what} in JSON, the admission "
                                  f"protocol before {PROTOCOL}")
        if first.startswith("protocol="):
            raise VersionMismatch(f"version mismatch: a {what} in admission protocol "
                                  f"{first[9:]!r}, not {PROTOCOL}")
        raise WireError(f"not a {what}: the first line is {first[:60]!r}, not "
                        f"{PROTOCOL_LINE!r}")
    body, end, rest = text.partition("\n\n")
    if not end:
        raise WireError(f"{what} without its end (an empty line)")
    if rest:
        raise WireError(f"{len(rest)} bytes after the {what}")
    pairs = []
    seen = set()
    for line in body.split("\n")[1:]:
        key, eq, value = line.partition("=")
        if not eq:
            raise WireError(f"{what}: line {line[:60]!r} is not key=value")
        if key not in keys:
            raise WireError(f"{what}: unknown key {key[:60]!r}")
        if key in seen and key != "env":
            raise WireError(f"{what}: {key} given twice")
        seen.add(key)
        pairs.append((key, unescape(value)))
    return pairs


def encode_request(request: Request) -> bytes:
    """The module's side, for tests and tools (the module has its own copy)."""
    return _encode((key, repr(getattr(request, key)) if key in _NUMBERS
                    else getattr(request, key)) for key in REQUEST_KEYS)


def decode_request(data: bytes) -> Request:
    """Raises VersionMismatch (another protocol) or WireError (malformed)."""
    raw = dict(_decode(data, REQUEST_KEYS, "request"))

    def number(key: str) -> float:
        try:
            return float(raw.get(key) or 0)
        except ValueError:
            raise WireError(f"request: {key}={raw[key][:60]!r} is not a number") from None

    return Request(user=raw.get("user", ""), service=raw.get("service", ""),
                   rhost=raw.get("rhost", ""), ssh_connection=raw.get("ssh_connection", ""),
                   action_no_jobs=raw.get("action_no_jobs", ""),
                   action_unknown=raw.get("action_unknown", ""),
                   action_adopt_failure=raw.get("action_adopt_failure", ""),
                   join_container=raw.get("join_container", ""),
                   nodename=raw.get("nodename", ""),
                   timeout=number("timeout"), deadline=number("deadline"))


def encode_reply(reply: Reply) -> bytes:
    """Raises WireError for an environment variable name that cannot be exported."""
    pairs = [(key, getattr(reply, key)) for key in REPLY_KEYS
             if key not in ("env", "namespaces")]
    for kind in reply.namespaces:
        if not kind.isalnum():
            raise WireError(f"reply: bad namespace kind {kind!r}")
    pairs.append(("namespaces", ",".join(reply.namespaces)))
    for name, value in reply.env.items():
        if not name or "=" in name or "\n" in name:
            raise WireError(f"reply: bad environment variable name {name!r}")
        pairs.append(("env", f"{name}={value}"))
    return _encode(pairs)


_DECISION_OF: Final[Mapping[str, Decision]] = {d: d for d in DECISIONS}


def decode_reply(data: bytes) -> Reply:
    """The module's side, for tests and tools (the module has its own copy)."""
    raw: dict[str, str] = {}
    env: dict[str, str] = {}
    for key, value in _decode(data, REPLY_KEYS, "reply"):
        if key == "env":
            name, eq, val = value.partition("=")
            if not name or not eq:
                raise WireError(f"reply: env={value[:60]!r} is not NAME=VALUE")
            env[name] = val
        else:
            raw[key] = value
    decision = _DECISION_OF.get(raw.get("decision", ""))
    if decision is None:
        raise WireError(f"reply: decision {raw.get('decision', '')[:20]!r} is not one of "
                        f"{'|'.join(DECISIONS)}")
    kinds = tuple(raw["namespaces"].split(",")) if raw.get("namespaces") else ()
    return Reply(decision, reason=raw.get("reason", ""), message=raw.get("message", ""),
                 job_id=raw.get("job_id", ""), detail=raw.get("detail", ""), env=env,
                 namespaces=kinds)
