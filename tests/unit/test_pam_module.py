"""pam/pam_adopt.py (and pam_adopt_impl.py, which it loads) with a fake pam handle and a
fake agent on a real Unix socket.

The real module under real pam_python and sshd is exercised by the integration tests;
here: option parsing, the decision order, failure actions, the deadline, and the
contract: the module cannot import node_agent, so it keeps copies of
node_agent/pamcontract.py, which must equal it, and each side must read what the other
writes.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from node_agent import jobenv, pamcontract
from node_agent.pamcontract import Reply, Request

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "pam" / "pam_adopt.py"
IMPL = MODULE.with_name("pam_adopt_impl.py")


def load(path: Path = MODULE) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


loader = load()
pam_adopt = loader.impl  # the logic, as the loader loaded it


class FakePamh:
    PAM_SUCCESS = 0
    PAM_SYSTEM_ERR = 4
    PAM_PERM_DENIED = 6
    PAM_IGNORE = 25
    PAM_ERROR_MSG = 3
    PAM_SILENT = 0x8000

    class Message:
        def __init__(self, style: int, text: str) -> None:
            self.msg_style = style
            self.msg = text

    def __init__(self, user: str = "alice", service: str = "sshd",
                 ssh: str = "10.0.0.1 40000 10.0.0.2 22") -> None:
        self.user = user
        self.service = service
        self.rhost = "10.0.0.1"
        self.env: dict[str, str] = {"SSH_CONNECTION": ssh} if ssh else {}
        self.told: list[str] = []

    def get_user(self, prompt: object) -> str:
        return self.user

    def conversation(self, msg: Message) -> None:
        self.told.append(msg.msg)


Answer = Callable[[Request], "Reply | bytes"]


class FakeAgent:
    """Answers each request with reply(request), encoded unless it is bytes already (or
    never, when reply is None)."""

    def __init__(self, path: Path, reply: Answer | None):
        self.requests: list[Request] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.reply = reply
        self.close_silent = False
        self.held: list[socket.socket] = []
        self.send_fds: list[str] = []  # paths opened and sent with each reply (SCM_RIGHTS)
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while not pamcontract.complete(data):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            req = pamcontract.decode_request(data)
            self.requests.append(req)
            if self.close_silent:
                conn.close()  # drop it: no answer at all
                continue
            if self.reply is None:
                self.held.append(conn)  # silent: never answer
                continue
            answer = self.reply(req)
            data = answer if isinstance(answer, bytes) else pamcontract.encode_reply(answer)
            fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in self.send_fds]
            try:
                if fds:
                    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           struct.pack(f"{len(fds)}i", *fds))])
                else:
                    conn.sendall(data)
            finally:
                for fd in fds:
                    os.close(fd)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def agent_path(tmp_path: Path) -> Path:
    return tmp_path / "admission.sock"


@pytest.fixture
def agent(agent_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(reply: Answer | None) -> FakeAgent:
        a = FakeAgent(agent_path, reply)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def call(pamh: FakePamh, *options: str, flags: int = 0) -> int:
    result: int = pam_adopt.pam_sm_acct_mgmt(pamh, flags, [str(MODULE), *options])
    return result


# -- options ---------------------------------------------------------------------------------

def test_defaults() -> None:
    o = pam_adopt.Options.parse([])
    assert (o.action_no_jobs, o.action_unknown, o.action_adopt_failure,
            o.action_generic_failure, o.service, o.timeout, o.log_level) == (
        "deny", "newest", "deny", "deny", "sshd", 5.0, "info")
    assert o.socket == "/run/callerid-adopt/admission.sock" and o.problems == []


@pytest.mark.parametrize("arg, attr, value", [
    ("action_no_jobs=ignore", "action_no_jobs", "ignore"),
    ("action_unknown=allow", "action_unknown", "allow"),
    ("action_unknown=deny", "action_unknown", "deny"),
    ("action_adopt_failure=allow", "action_adopt_failure", "allow"),
    ("action_generic_failure=ignore", "action_generic_failure", "ignore"),
    ("action_generic_failure=allow", "action_generic_failure", "allow"),
    ("service=lab-sshd-node2", "service", "lab-sshd-node2"),
    ("service=*", "service", "*"),
    ("timeout=0.5", "timeout", 0.5),
    ("socket=/run/x.sock", "socket", "/run/x.sock"),
    ("log_level=debug", "log_level", "debug"),
])
def test_each_option(arg: str, attr: str, value: object) -> None:
    o = pam_adopt.Options.parse([arg])
    assert getattr(o, attr) == value and o.problems == []


@pytest.mark.parametrize("arg, attr, default", [
    ("action_no_jobs=allow", "action_no_jobs", "deny"),
    ("action_unknown=any", "action_unknown", "newest"),
    ("action_generic_failure=", "action_generic_failure", "deny"),
    ("timeout=-1", "timeout", 5.0), ("timeout=abc", "timeout", 5.0),
    ("timeout=1e9", "timeout", 5.0), ("socket=relative", "socket",
                                        "/run/callerid-adopt/admission.sock"),
    ("service=", "service", "sshd"),
])
def test_bad_values_are_logged_and_defaulted(arg: str, attr: str, default: object) -> None:
    o = pam_adopt.Options.parse([arg])
    assert getattr(o, attr) == default
    assert len(o.problems) == 1
    # The line in syslog names the value that is used instead.
    assert o.problems[0].endswith(f"using {default:g}" if isinstance(default, float)
                                  else f"using {default}"), o.problems[0]


def test_bad_timeout_keeps_an_earlier_good_one() -> None:
    o = pam_adopt.Options.parse(["timeout=3", "timeout=never"])
    assert o.timeout == 3.0 and o.problems == ["timeout='never' is not a number of "
                                               "seconds in (0, 60]; using 3"]


def test_unknown_and_malformed_options_are_ignored() -> None:
    o = pam_adopt.Options.parse(["nosuchoption=x", "debug"])
    assert len(o.problems) == 2 and "unknown option 'nosuchoption'" in o.problems[0]


def test_pam_slurm_adopts_other_options_are_accepted() -> None:
    o = pam_adopt.Options.parse(["nodename=cn017", "disable_x11=1", "join_container=false"])
    assert (o.nodename, o.disable_x11, o.join_container, o.problems) == (
        "cn017", "1", "false", [])
    for bad in ("nodename=", "nodename=a b", "nodename=x=y"):
        o = pam_adopt.Options.parse([bad])
        assert o.nodename == "" and o.problems == [
            f"nodename={bad[9:]!r} is not a node name; using the agent's"]
    o = pam_adopt.Options.parse(["join_container=no", "disable_x11=yes"])
    assert (o.join_container, o.disable_x11, len(o.problems)) == ("true", "0", 2)


def test_request_is_a_valid_request() -> None:
    deadline = time.monotonic() + 5
    data = pam_adopt.build_request("alice", "sshd", "10.0.0.1", "10.0.0.1 1 10.0.0.2 22",
                                   pam_adopt.Options.parse(["action_unknown=deny",
                                                            "nodename=node2"]), deadline)
    req = pamcontract.decode_request(data)  # unknown keys would raise
    assert req == Request(user="alice", service="sshd", rhost="10.0.0.1",
                          ssh_connection="10.0.0.1 1 10.0.0.2 22", action_no_jobs="deny",
                          action_unknown="deny", action_adopt_failure="deny",
                          join_container="true", nodename="node2", timeout=5.0,
                          deadline=deadline)  # every digit of the deadline kept
    # Every field of the contract's request, in its order.
    keys = [line.split("=")[0] for line in data.decode().split("\n")[1:] if line]
    assert keys == list(pamcontract.REQUEST_KEYS)


# -- one contract: the module's copies equal node_agent/pamcontract.py ----------------------

def test_the_modules_copies_equal_the_contract() -> None:
    for name in ("DEFAULT_SOCKET", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "DEFAULT_SERVICE",
                 "CHOICES", "AGENT_OPTIONS", "MSG_GENERIC", "MSG_GENERIC_DEFAULT",
                 "MSG_ADOPT_FAILED", "PROTOCOL_LINE", "REPLY_KEYS", "DECISIONS"):
        assert getattr(pam_adopt, name) == getattr(pamcontract, name), name
    for name in ("JOIN_KINDS", "CLONE_FLAGS"):
        assert getattr(pam_adopt, name) == getattr(jobenv, name), name
    assert loader.DEFAULT_SOCKET == pamcontract.DEFAULT_SOCKET  # the early connection's


def test_options_and_defaults_are_the_contracts() -> None:
    o = pam_adopt.Options.parse([])
    for key, (default, allowed) in pamcontract.CHOICES.items():
        assert getattr(o, key) == default, key
        for value in allowed:
            assert getattr(pam_adopt.Options.parse([f"{key}={value}"]), key) == value
        assert pam_adopt.Options.parse([f"{key}=nonsense"]).problems
    assert (o.service, o.socket, o.timeout) == (
        pamcontract.DEFAULT_SERVICE, pamcontract.DEFAULT_SOCKET, pamcontract.DEFAULT_TIMEOUT)
    assert pam_adopt.Options.parse([f"timeout={pamcontract.MAX_TIMEOUT:g}"]).problems == []
    assert pam_adopt.Options.parse([f"timeout={pamcontract.MAX_TIMEOUT + 1:g}"]).problems
    # Every option the contract names is the module's, and no other.
    names = {n for n in vars(o) if n != "problems"}
    assert names == set(pamcontract.OPTIONS)


def test_the_agent_uses_the_contract() -> None:
    from node_agent import config
    from node_agent.agent import admission

    assert config.AgentConfig().admission_socket == pamcontract.DEFAULT_SOCKET
    assert admission.options_of(Request()) == {
        key: pamcontract.CHOICES[key][0] for key in pamcontract.AGENT_OPTIONS}
    assert admission.module_timeout(Request()) == pamcontract.DEFAULT_TIMEOUT
    assert admission.module_timeout(Request(timeout=pamcontract.MAX_TIMEOUT + 1)) == \
        pamcontract.DEFAULT_TIMEOUT


def documented_options(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{option: (default, values)} of the module docstring's list."""
    found = {}
    for m in re.finditer(r"^    (\w+)=(\S+)\s+default (\S+|\(.+\))$", text, re.M):
        found[m.group(1)] = (m.group(3), tuple(m.group(2).split("|")))
    return found


def test_the_documented_options_are_the_contracts() -> None:
    # The module's docstring and deploy/pam/README.md's table: names, values, defaults.
    doc = documented_options(pam_adopt.__doc__ or "")
    assert list(doc) == list(pamcontract.OPTIONS)
    readme = (REPO / "deploy" / "pam" / "README.md").read_text()
    rows = {name: (re.findall(r"`([^`]+)`", values), default.strip("`")) for name, values,
            default in re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+?) \|", readme, re.M)}
    assert list(rows) == list(pamcontract.OPTIONS)
    for key, (default, allowed) in pamcontract.CHOICES.items():
        assert doc[key] == (default, allowed), key
        assert rows[key] == (list(allowed), default), key
    assert rows["socket"][1] == pamcontract.DEFAULT_SOCKET
    assert doc["service"][0] == pamcontract.DEFAULT_SERVICE
    assert doc["socket"][0] == pamcontract.DEFAULT_SOCKET
    assert float(doc["timeout"][0]) == pamcontract.DEFAULT_TIMEOUT
    assert f"(0, {pamcontract.MAX_TIMEOUT:g}]" in readme


def test_module_sends_its_deadline(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: Reply("ALLOW", reason="one-job", job_id="1"))
    before = time.monotonic()
    assert call(FakePamh(), f"socket={agent_path}", "timeout=3") == FakePamh.PAM_SUCCESS
    after = time.monotonic()
    req = a.requests[0]
    # Its deadline on this machine's CLOCK_MONOTONIC (the agent's clock too): the start
    # of its exchange plus its timeout.
    assert before + 3 <= req.deadline <= after + 3 and req.timeout == 3.0


def test_agent_closing_without_an_answer_is_a_generic_failure(
        agent: Callable[..., FakeAgent], agent_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    # The agent drops a request it will not act on (e.g. read after the deadline).
    lines: list[str] = []
    monkeypatch.setattr(pam_adopt.Log, "_send", lambda self, sev, msg: lines.append(msg))
    a = agent(None)
    a.close_silent = True
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED
    assert pamh.told == [pam_adopt.MSG_GENERIC]
    assert any("closed the connection without an answer" in ln for ln in lines), lines


# -- the decision order ---------------------------------------------------------------------

def test_root_is_ignored_before_anything(agent_path: Path) -> None:
    # No agent exists; root must not even try to reach one.
    assert call(FakePamh("root"), f"socket={agent_path}") == FakePamh.PAM_IGNORE


def test_other_services_are_ignored(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: Reply("DENY"))
    assert call(FakePamh(service="su"), f"socket={agent_path}") == FakePamh.PAM_IGNORE
    assert a.requests == []
    assert call(FakePamh(service="su"), f"socket={agent_path}", "service=*") == \
        FakePamh.PAM_PERM_DENIED


def test_allow_exports_environment(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: Reply("ALLOW", job_id="42", reason="one-job",
                              env=jobenv.of_job("42", "node2")))
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}", "action_unknown=deny") == FakePamh.PAM_SUCCESS
    assert pamh.env[jobenv.JOB_ID] == "42" and pamh.env[jobenv.NODE] == "node2"
    req = a.requests[0]
    assert req.user == "alice" and req.ssh_connection == "10.0.0.1 40000 10.0.0.2 22"
    assert req.action_unknown == "deny"


def test_deny_tells_the_user_one_sentence(agent: Callable[..., FakeAgent],
                                          agent_path: Path) -> None:
    msg = "Access denied by pam_adopt: you have no active jobs on this node"
    agent(lambda r: Reply("DENY", reason="no-jobs", message=msg))
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED
    assert pamh.told == [msg]
    silent = FakePamh()
    assert call(silent, f"socket={agent_path}", flags=FakePamh.PAM_SILENT) == \
        FakePamh.PAM_PERM_DENIED
    assert silent.told == []


def test_ignore_decision(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    agent(lambda r: Reply("IGNORE", reason="no-jobs"))
    assert call(FakePamh(), f"socket={agent_path}") == FakePamh.PAM_IGNORE


@pytest.mark.parametrize("action, expected", [("deny", FakePamh.PAM_PERM_DENIED),
                                              ("allow", FakePamh.PAM_SUCCESS),
                                              ("ignore", FakePamh.PAM_IGNORE)])
def test_agent_down_applies_generic_failure(agent_path: Path, action: str,
                                            expected: int) -> None:
    pamh = FakePamh()
    rc = call(pamh, f"socket={agent_path}", f"action_generic_failure={action}")
    assert rc == expected
    assert bool(pamh.told) == (action == "deny")


def test_silent_agent_costs_at_most_the_timeout(agent: Callable[..., FakeAgent],
                                                agent_path: Path) -> None:
    agent(None)
    t0 = time.monotonic()
    rc = call(FakePamh(), f"socket={agent_path}", "timeout=0.3")
    elapsed = time.monotonic() - t0
    assert rc == FakePamh.PAM_PERM_DENIED
    assert 0.25 < elapsed < 1.0


@pytest.mark.parametrize("garbage", [
    b"protocol=2\ndecision=MAYBE\n\n", b"protocol=2\n\n", b"protocol=2\nreason=x\n\n",
    b"protocol=2\ndecision=ALLOW\n", b"protocol=2\ndecision=ALLOW\nwhat\n\n",
    b"protocol=2\ndecision=ALLOW\nsurprise=1\n\n", b"protocol=2\ndecision=ALLOW\nenv=X\n\n",
    b"protocol=2\ndecision=ALLOW\ndecision=DENY\n\n", b'["ALLOW"]\n', b"\x00\xff\n",
])
def test_garbled_answer_is_a_generic_failure(agent: Callable[..., FakeAgent], agent_path: Path,
                                             garbage: bytes, monkeypatch: pytest.MonkeyPatch,
                                             ) -> None:
    lines: list[str] = []
    monkeypatch.setattr(pam_adopt.Log, "_send", lambda self, sev, msg: lines.append(msg))
    agent(lambda r: garbage)
    assert call(FakePamh(), f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED
    assert call(FakePamh(), f"socket={agent_path}", "action_generic_failure=allow") == \
        FakePamh.PAM_SUCCESS
    assert all("garbled answer" in ln and "mismatch" not in ln for ln in lines), lines


# What an agent before protocol 2 answers a request it cannot parse (its JSON line).
OLD_AGENT_ANSWER = (b'{"decision": "DENY", "message": "Access denied by pam_adopt: internal '
                    b'error", "reason": "bad-request", "detail": "Failed to parse input."}\n')


@pytest.mark.parametrize("answer", [OLD_AGENT_ANSWER, pamcontract.VERSION_MISMATCH_ANSWER,
                                    b"protocol=3\ndecision=ALLOW\n\n"],
                         ids=["old-agent", "newer-agent", "protocol-3"])
@pytest.mark.parametrize("action, rc", [("deny", FakePamh.PAM_PERM_DENIED),
                                        ("ignore", FakePamh.PAM_IGNORE)])
def test_an_agent_of_another_version_is_a_generic_failure_that_says_so(
        agent: Callable[..., FakeAgent], agent_path: Path, monkeypatch: pytest.MonkeyPatch,
        answer: bytes, action: str, rc: int) -> None:
    # An upgrade half done (the agent not restarted, or the module not installed): the
    # configured generic failure, and a syslog line that names the cause.
    lines: list[str] = []
    monkeypatch.setattr(pam_adopt.Log, "_send", lambda self, sev, msg: lines.append(msg))
    agent(lambda r: answer)
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}", f"action_generic_failure={action}") == rc
    assert pamh.told == ([pam_adopt.MSG_GENERIC] if action == "deny" else [])
    (line,) = lines
    assert "version mismatch: the agent at" in line and "restart the agent" in line, line
    assert line.endswith(f"; action_generic_failure={action}"), line


class _WithoutTypeChecking(ast.NodeTransformer):
    def visit_If(self, node: ast.If) -> ast.AST | None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return None  # for the type checker only: never run
        return self.generic_visit(node)


@pytest.mark.parametrize("path", [MODULE, IMPL])
def test_module_imports_only_cheap_standard_modules(path: Path) -> None:
    tree = _WithoutTypeChecking().visit(ast.parse(path.read_text()))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"_frozen_importlib_external"}, names
    # Each of these costs milliseconds in every login (a fresh interpreter each time).
    assert not names & {"grpc", "json", "socket", "importlib", "re", "enum", "logging",
                        "syslog", "subprocess", "typing", "collections", "dataclasses",
                        "__future__"}, names


LOAD_AND_LIST_IMPORTS = """
import sys
before = set(sys.modules)
path = sys.argv[1]
with open(path) as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "pam_adopt", "__file__": path})
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_loading_the_module_imports_only_c_level_modules() -> None:
    # What a login's fresh interpreter pays: everything the loader and the logic import
    # when they run (annotations included) is compiled into the interpreter, or was
    # loaded at its start. A runtime `import typing` or an unquoted annotation naming a
    # type-checking-only class would show here (or fail).
    out = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_LIST_IMPORTS, str(MODULE)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    loaded = set(out.split())
    assert loaded <= set(sys.builtin_module_names), loaded - set(sys.builtin_module_names)


def test_loader_exports_the_hooks_and_caches_bytecode() -> None:
    import sys

    for hook in ("pam_sm_acct_mgmt", "pam_sm_authenticate", "pam_sm_setcred",
                 "pam_sm_open_session", "pam_sm_close_session", "pam_sm_chauthtok"):
        assert getattr(loader, hook) is getattr(loader.impl, hook)
    cache = IMPL.parent / "__pycache__" / f"pam_adopt_impl.{sys.implementation.cache_tag}.pyc"
    cache.unlink(missing_ok=True)
    before = sys.dont_write_bytecode
    try:
        again = load()  # as pam_python: bytecode writing off, turned back on for the impl
    finally:
        sys.dont_write_bytecode = before
    assert cache.exists()
    assert again.impl.Options.parse([]).service == "sshd"


def test_deploy_example_line_uses_only_valid_options() -> None:
    example = (MODULE.parents[1] / "deploy" / "pam" / "sshd.example").read_text()
    lines = [ln for ln in example.splitlines() if "pam_adopt.py" in ln and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[0] == "-account" and fields[1] == "required"
    opts = pam_adopt.Options.parse(fields[fields.index(
        "/opt/callerid-adopt/pam/pam_adopt.py") + 1:])
    assert opts.problems == []


# -- the wire format: each side reads what the other writes ---------------------------------

WIRE_VALUES = ["", "plain", "back\\slash", "line\nfeed", "a literal \\n", "\\\\n",
               "trailing\\", "\\", "a=b=c", "é ü ∑ 漢字 😀", "\x00\x01\t\r", "\n\n\n",
               "protocol=2", " spaces "]


@pytest.mark.parametrize("value", WIRE_VALUES)
def test_the_agent_reads_what_the_module_writes(value: str) -> None:
    opts = pam_adopt.Options.parse(["timeout=0.25"])
    data = pam_adopt.build_request(value, "sshd", value, value, opts, 1234.5678901234)
    assert data.endswith(b"\n\n") and data.count(b"\n\n") == 1  # the end is the end
    assert pamcontract.complete(data) and not pamcontract.complete(data[:-1])
    req = pamcontract.decode_request(data)
    assert (req.user, req.rhost, req.ssh_connection) == (value, value, value)
    assert (req.timeout, req.deadline) == (0.25, 1234.5678901234)
    assert pamcontract.encode_request(req) == data  # one encoding on both sides


@pytest.mark.parametrize("value", WIRE_VALUES)
def test_the_module_reads_what_the_agent_writes(value: str) -> None:
    reply = Reply("DENY", reason="no-jobs", message=value, job_id=value, detail=value,
                  env={jobenv.JOB_ID: value, "B": "x=y"})
    fields, env = pam_adopt.decode_reply(pamcontract.encode_reply(reply))
    assert fields == {k: v for k, v in (("decision", "DENY"), ("reason", "no-jobs"),
                                        ("message", value), ("job_id", value),
                                        ("detail", value)) if v}
    assert dict(env) == {jobenv.JOB_ID: value, "B": "x=y"}
    assert pamcontract.decode_reply(pamcontract.encode_reply(reply)) == reply


def test_escaping_is_the_documented_one() -> None:
    # A backslash travels as two, a line feed as backslash + n; nothing else changes.
    assert pamcontract.escape("a\\b\nc=d\té") == "a\\\\b\\nc=d\té"
    for value in WIRE_VALUES:
        assert pamcontract.unescape(pamcontract.escape(value)) == value
        assert "\n" not in pamcontract.escape(value)


@pytest.mark.parametrize("data", [
    b"", b"protocol=2\nuser=a\n", b"protocol=2\nuser=a\n\nmore", b"user=a\n\n",
    b"protocol=2\nuser=a\nenv=X=1\n\n", b"protocol=2\nuser=a\ndeadline=soon\n\n",
])
def test_the_contract_refuses_malformed_requests(data: bytes) -> None:
    with pytest.raises(pamcontract.WireError):
        pamcontract.decode_request(data)


def test_early_connection_is_used_for_the_default_path_only(
        agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: Reply("ALLOW", reason="one-job", job_id="1"))
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(agent_path))
    pam_adopt.EARLY = (str(agent_path), early)
    assert call(FakePamh(), f"socket={agent_path}") == FakePamh.PAM_SUCCESS
    assert early.fileno() == -1 and pam_adopt.EARLY is None  # used, then closed
    assert len(a.requests) == 1
    # For root the early connection is not used, and closed all the same.
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pam_adopt.EARLY = (str(agent_path), other)
    assert call(FakePamh("root"), f"socket={agent_path}") == FakePamh.PAM_IGNORE
    assert pam_adopt.EARLY is None and other.fileno() == -1


# -- the job's namespaces (join_container) ---------------------------------------------------

NS = {"mnt": "/proc/self/ns/mnt", "net": "/proc/self/ns/net", "uts": "/proc/self/ns/uts"}


def nsfs_fds() -> list[int]:
    """This process's fds open on a namespace ("mnt:[4026531841]")."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.partition(":")[0] in NS and target.endswith("]"):
            out.append(int(name))
    return out


def fds_back_to(before: list[int]) -> bool:
    """Whether the namespace fds open in this process are `before` again: the module's
    all closed when it returns, the fake agent's once its thread has sent them."""
    deadline = time.monotonic() + 10
    while nsfs_fds() != before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def entered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], int]]:
    """setns() recorded instead of done (this test process must stay where it is):
    (the namespace's (st_dev, st_ino), the CLONE_NEW* flag) of each call."""
    calls: list[tuple[tuple[int, int], int]] = []

    def fake_setns(fd: int, flag: int) -> None:
        st = os.fstat(fd)
        calls.append(((st.st_dev, st.st_ino), flag))

    monkeypatch.setattr(pam_adopt, "setns", fake_setns)
    return calls


def ns_of(kind: str) -> tuple[int, int]:
    st = os.stat(NS[kind])
    return st.st_dev, st.st_ino


def adopted(*kinds: str) -> Answer:
    return lambda r: Reply("ALLOW", reason="one-job", job_id="42", namespaces=kinds,
                           env={jobenv.JOB_ID: "42"})


@pytest.fixture
def syslog(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(pam_adopt.Log, "_send", lambda self, sev, msg: lines.append(msg))
    return lines


def test_the_module_asks_for_the_namespaces_by_default(agent: Callable[..., FakeAgent],
                                                       agent_path: Path) -> None:
    a = agent(adopted())
    call(FakePamh(), f"socket={agent_path}")
    call(FakePamh(), f"socket={agent_path}", "join_container=false")
    assert [r.join_container for r in a.requests] == ["true", "false"]


def test_the_module_enters_the_namespaces_in_order_and_closes_every_fd(
        agent: Callable[..., FakeAgent], agent_path: Path,
        entered: list[tuple[tuple[int, int], int]], syslog: list[str]) -> None:
    a = agent(adopted("net", "mnt"))
    a.send_fds = [NS["net"], NS["mnt"]]
    before = nsfs_fds()
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}") == FakePamh.PAM_SUCCESS
    assert entered == [(ns_of("net"), 0x40000000), (ns_of("mnt"), 0x00020000)]
    assert fds_back_to(before)
    assert pamh.env[jobenv.JOB_ID] == "42"
    assert "entered its net,mnt namespaces" in syslog[-1], syslog


def test_a_job_without_namespaces_costs_no_setns(agent: Callable[..., FakeAgent],
                                                 agent_path: Path,
                                                 entered: list[object]) -> None:
    agent(adopted())
    assert call(FakePamh(), f"socket={agent_path}") == FakePamh.PAM_SUCCESS
    assert entered == []


@pytest.mark.parametrize("reply, options", [
    (adopted("mnt"), ["join_container=false"]),                  # not asked for
    (lambda r: Reply("DENY", reason="no-jobs", message="no"), []),  # not an adoption
    (lambda r: Reply("ALLOW", reason="unknown-allow"), []),     # admitted, in no job
    (adopted(), []),                                            # fds the reply does not name
], ids=["unasked", "deny", "no-job", "unnamed"])
def test_fds_the_module_did_not_ask_for_are_closed_and_logged(
        agent: Callable[..., FakeAgent], agent_path: Path, entered: list[object],
        syslog: list[str], reply: Answer, options: list[str]) -> None:
    a = agent(reply)
    a.send_fds = [NS["mnt"]]
    before = nsfs_fds()
    call(FakePamh(), f"socket={agent_path}", *options)
    assert entered == [] and fds_back_to(before)
    assert any("the agent sent 1 fds" in ln and "closed, unused" in ln for ln in syslog), \
        syslog


@pytest.mark.parametrize("kinds, paths, why", [
    (("mnt", "net"), ["mnt"], "1 namespace fds for mnt,net"),
    (("mnt",), ["mnt", "net"], "2 namespace fds for mnt"),
    (("user",), ["mnt"], "will not enter user namespaces"),
    (("mnt", "bogus"), ["mnt", "net"], "will not enter bogus namespaces"),
    (("mnt",), ["mnt"] * 9, "(cut off)"),
], ids=["fewer", "more", "user", "unknown", "truncated"])
@pytest.mark.parametrize("action, rc", [("deny", FakePamh.PAM_PERM_DENIED),
                                        ("allow", FakePamh.PAM_SUCCESS)])
def test_namespaces_that_cannot_be_entered_are_an_adoption_failure(
        agent: Callable[..., FakeAgent], agent_path: Path, entered: list[object],
        syslog: list[str], kinds: tuple[str, ...], paths: list[str], why: str,
        action: str, rc: int) -> None:
    a = agent(adopted(*kinds))
    a.send_fds = [NS[p] for p in paths]
    before = nsfs_fds()
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}", f"action_adopt_failure={action}") == rc
    assert entered == [] and fds_back_to(before)
    assert pamh.told == ([pam_adopt.MSG_ADOPT_FAILED] if action == "deny" else [])
    assert (jobenv.JOB_ID in pamh.env) == (action == "allow")
    (line,) = [ln for ln in syslog if "cannot enter job 42's namespaces" in ln]
    assert why in line and line.endswith(f"action_adopt_failure={action}"), line


def test_a_failing_setns_is_an_adoption_failure_that_says_which(
        agent: Callable[..., FakeAgent], agent_path: Path, syslog: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def setns(fd: int, flag: int) -> None:
        if flag == 0x00020000:
            raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(pam_adopt, "setns", setns)
    a = agent(adopted("net", "mnt"))
    a.send_fds = [NS["net"], NS["mnt"]]
    before = nsfs_fds()
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED  # default deny
    assert pamh.told == [pam_adopt.MSG_ADOPT_FAILED] and fds_back_to(before)
    assert any("setns mnt: Operation not permitted (entered net)" in ln for ln in syslog)


ENTER_FOR_REAL = """
import os, sys
sys.path.insert(0, sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("pam_adopt", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
impl = mod.impl
if sys.argv[4] == "ctypes":
    os.__dict__.pop("setns", None)   # Python 3.12+: take the ctypes path all the same
received = impl.Received()
received.fds = [os.open(f"/proc/{sys.argv[3]}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)]
print("ctypes" in sys.modules, end=" ")
print(impl.join_namespaces(["mnt"], received), end=" ")
received.close()
print("ctypes" in sys.modules, os.readlink("/proc/self/ns/mnt"))
"""


@pytest.mark.root
@pytest.mark.parametrize("how", ["ctypes", "os"])
def test_setns_enters_a_real_mount_namespace(how: str) -> None:
    if how == "os" and not hasattr(os, "setns"):
        pytest.skip("os.setns is Python 3.12+")
    job = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        mine = os.readlink("/proc/self/ns/mnt")
        while os.readlink(f"/proc/{job.pid}/ns/mnt") == mine:   # until unshare is done
            assert time.monotonic() < deadline
            time.sleep(0.01)
        out = subprocess.run([sys.executable, "-I", "-c", ENTER_FOR_REAL, str(REPO),
                              str(MODULE), str(job.pid), how],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.split() == ["False", "['mnt']", str(how == "ctypes"),
                               os.readlink(f"/proc/{job.pid}/ns/mnt")]
    finally:
        job.kill()
        job.wait()
