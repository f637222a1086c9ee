"""pam/pam_adopt.py (and pam_adopt_impl.py, which it loads) with a fake pam handle and a
fake agent on a real Unix socket.

The real module under real pam_python and sshd is exercised by the integration tests;
here: option parsing, the decision order, failure actions, the deadline, and that the
module's request is a valid AdmissionRequest (the schema lives in the .proto).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import json_format

from node_agent.proto.v1 import admission_pb2 as apb

MODULE = Path(__file__).resolve().parents[2] / "pam" / "pam_adopt.py"
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


class FakeAgent:
    """Answers each request line with reply(request) (or never, when reply is None)."""

    def __init__(self, path: Path, reply: Callable[[dict[str, Any]], dict[str, Any]] | None):
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.reply = reply
        self.close_silent = False
        self.held: list[socket.socket] = []
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while b"\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            req = json.loads(data)
            self.requests.append(req)
            if self.close_silent:
                conn.close()  # drop it: no answer at all
                continue
            if self.reply is None:
                self.held.append(conn)  # silent: never answer
                continue
            conn.sendall((json.dumps(self.reply(req)) + "\n").encode())
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

    def make(reply: Callable[[dict[str, Any]], dict[str, Any]] | None) -> FakeAgent:
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
    o = pam_adopt.Options.parse(["nodename=x", "debug"])
    assert len(o.problems) == 2 and "unknown option 'nodename'" in o.problems[0]


def test_request_is_a_valid_admission_request() -> None:
    deadline = time.monotonic() + 5
    req = pam_adopt.build_request("alice", "sshd", "10.0.0.1", "10.0.0.1 1 10.0.0.2 22",
                                  pam_adopt.Options.parse(["action_unknown=deny"]), deadline)
    msg = apb.AdmissionRequest()
    json_format.Parse(pam_adopt.json_dumps(req), msg)  # unknown fields would raise
    assert msg.options.action_unknown == "deny" and msg.ssh_connection.startswith("10.0.0.1 ")
    assert msg.deadline == deadline  # the module's own codec keeps every digit


def test_options_and_defaults_match_the_agents() -> None:
    # One contract: the agent interprets what the module sends, with the same defaults.
    from node_agent.agent import admission

    for key, default in admission.DEFAULTS.items():
        assert pam_adopt.CHOICES[key][0] == default, key
        assert set(pam_adopt.CHOICES[key][1]) == set(admission.CHOICES[key]), key
    o = pam_adopt.Options.parse([])
    assert o.timeout == admission.DEFAULT_TIMEOUT
    assert o.socket == pam_adopt.DEFAULT_SOCKET == loader.DEFAULT_SOCKET
    assert pam_adopt.Options.parse([f"timeout={admission.MAX_TIMEOUT:g}"]).problems == []
    assert pam_adopt.Options.parse([f"timeout={admission.MAX_TIMEOUT + 1:g}"]).problems


def test_module_sends_its_deadline(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: {"decision": "ALLOW", "reason": "one-job", "job_id": "1"})
    before = time.monotonic()
    assert call(FakePamh(), f"socket={agent_path}", "timeout=3") == FakePamh.PAM_SUCCESS
    after = time.monotonic()
    req = a.requests[0]
    # Its deadline on this machine's CLOCK_MONOTONIC (the agent's clock too): the start
    # of its exchange plus its timeout.
    assert before + 3 <= req["deadline"] <= after + 3
    json_format.Parse(json.dumps(req), apb.AdmissionRequest())


def test_agent_closing_without_an_answer_is_a_generic_failure(
        agent: Callable[..., FakeAgent], agent_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    # The agent drops a request it will not act on (e.g. read after the deadline).
    lines: list[str] = []
    monkeypatch.setattr(pam_adopt.Log, "_send", lambda self, sev, msg: lines.append(msg))
    a = agent(lambda r: {})
    a.reply = None
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
    a = agent(lambda r: {"decision": "DENY"})
    assert call(FakePamh(service="su"), f"socket={agent_path}") == FakePamh.PAM_IGNORE
    assert a.requests == []
    assert call(FakePamh(service="su"), f"socket={agent_path}", "service=*") == \
        FakePamh.PAM_PERM_DENIED


def test_allow_exports_environment(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: {"decision": "ALLOW", "job_id": "42", "reason": "one-job",
                         "env": {"CALLERID_JOB_ID": "42"}})
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}", "action_unknown=deny") == FakePamh.PAM_SUCCESS
    assert pamh.env["CALLERID_JOB_ID"] == "42"
    req = a.requests[0]
    assert req["user"] == "alice" and req["ssh_connection"] == "10.0.0.1 40000 10.0.0.2 22"
    assert req["options"]["action_unknown"] == "deny"


def test_deny_tells_the_user_one_sentence(agent: Callable[..., FakeAgent],
                                          agent_path: Path) -> None:
    msg = "Access denied by pam_adopt: you have no active jobs on this node"
    agent(lambda r: {"decision": "DENY", "reason": "no-jobs", "message": msg})
    pamh = FakePamh()
    assert call(pamh, f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED
    assert pamh.told == [msg]
    silent = FakePamh()
    assert call(silent, f"socket={agent_path}", flags=FakePamh.PAM_SILENT) == \
        FakePamh.PAM_PERM_DENIED
    assert silent.told == []


def test_ignore_decision(agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    agent(lambda r: {"decision": "IGNORE", "reason": "no-jobs"})
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


@pytest.mark.parametrize("garbage", [{"decision": "MAYBE"}, {}, ["ALLOW"]])
def test_garbled_answer_is_a_generic_failure(agent: Callable[..., FakeAgent], agent_path: Path,
                                             garbage: Any) -> None:
    agent(lambda r: garbage)
    assert call(FakePamh(), f"socket={agent_path}") == FakePamh.PAM_PERM_DENIED
    assert call(FakePamh(), f"socket={agent_path}", "action_generic_failure=allow") == \
        FakePamh.PAM_SUCCESS


@pytest.mark.parametrize("path", [MODULE, IMPL])
def test_module_imports_only_cheap_standard_modules(path: Path) -> None:
    import ast
    import sys

    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"_frozen_importlib_external"}, names
    # Each of these costs milliseconds in every login (a fresh interpreter each time).
    assert not names & {"grpc", "json", "socket", "importlib", "re", "enum", "logging",
                        "syslog", "subprocess"}, names


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


# -- the module's own JSON codec (it may not import json: ~15 ms a login) ----------------

CODEC_CASES: list[Any] = [
    {}, [], "", "plain", 'quote " and \\ backslash', "tab\tnew\nline\r\b\f", "\x00\x01\x1f",
    "é ü ∑ 漢字", "emoji 😀", 0, -7, 3.25, 1e-9, True, False, None,
    {"user": "alice", "options": {"timeout": 2.0, "action_unknown": "newest"}},
    {"env": {"A": "1", "B": "x=y"}, "decision": "ALLOW", "nested": [1, [2, {"k": None}]]},
]


@pytest.mark.parametrize("value", CODEC_CASES)
def test_codec_matches_json(value: Any) -> None:
    assert json.loads(pam_adopt.json_dumps(value)) == value
    assert pam_adopt.json_loads(json.dumps(value)) == value
    assert pam_adopt.json_loads(json.dumps(value, ensure_ascii=False)) == value
    assert pam_adopt.json_loads(json.dumps(value, indent=2)) == value


def test_codec_reads_protobuf_json() -> None:
    reply = apb.AdmissionReply(decision=apb.AdmissionReply.ALLOW, job_id="42", reason="one-job",
                               env={"CALLERID_JOB_ID": "42", "X": 'q"\\'})
    text = json_format.MessageToJson(reply, preserving_proto_field_name=True, indent=None)
    assert pam_adopt.json_loads(text) == json.loads(text)


@pytest.mark.parametrize("bad", ["", "{", '{"a" 1}', '{"a": 1,}', '"unterminated', '"\\x"',
                                 "[1 2]", "nul", '{"a": 1} trailing', '"\\u12"'])
def test_codec_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        pam_adopt.json_loads(bad)


def test_early_connection_is_used_for_the_default_path_only(
        agent: Callable[..., FakeAgent], agent_path: Path) -> None:
    a = agent(lambda r: {"decision": "ALLOW", "reason": "one-job", "job_id": "1"})
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
