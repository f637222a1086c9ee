"""The agent's configuration file: every key checked, clear messages naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent import config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "agent.toml.example"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_example_config_parses() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.port == 411
    # the memory controller is the site's choice, never the example's default
    assert cfg.cgroup.v1 == ("freezer",)
    assert cfg.socket.startswith("/run/")
    assert cfg.login_services == ("sshd",)


def test_full_config(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, """
node_name = "n1"
listen = ["10.0.0.1:411", "[fd00::1]:411"]
admin_uids = [1500]
rpc_timeout = 0.5
login_services = ["sshd", "sshd-compute"]
max_workers = 8
max_sessions = 32
max_sessions_per_user = 4
session_open_timeout = 2.5
[munge]
socket = "/tmp/m.sock"
[cgroup]
v1 = ["freezer", "pids"]
v2 = false
subtree = "site/callerid"
"""))
    assert cfg.node_name == "n1"
    assert cfg.listen == ("10.0.0.1:411", "[fd00::1]:411")
    assert cfg.admin_uids == (1500,)
    assert cfg.rpc_timeout == 0.5
    assert cfg.login_services == ("sshd", "sshd-compute")
    assert (cfg.max_workers, cfg.max_sessions, cfg.max_sessions_per_user,
            cfg.session_open_timeout) == (8, 32, 4, 2.5)
    assert cfg.munge.socket == "/tmp/m.sock"
    assert cfg.cgroup.v1 == ("freezer", "pids")
    assert cfg.cgroup.v2 is False
    assert cfg.cgroup.subtree == "site/callerid"


@pytest.mark.parametrize("text, needle", [
    ("nonsense = 1", "nonsense: unknown setting"),
    ("port = true", "port: expected a port number"),
    ("port = 70000", "port: expected 1..65535"),
    ("listen = '10.0.0.1:1'", "listen: expected a list"),
    ("listen = ['10.0.0.1']", "expected HOST:PORT"),
    ("log_level = 'loud'", "log_level"),
    ("rpc_timeout = 0", "rpc_timeout"),
    ("admin_uids = ['root']", "admin_uids: expected a list of uids"),
    ("[munge]\nsockets = 'x'", "munge.sockets: unknown setting"),
    ("[cgroup]\nv1 = 'freezer'", "cgroup.v1: expected a list of strings"),
    ("[cgroup]\nsubtree = '../escape'", "cgroup.subtree"),
    ("[cgroup]\nsubtree = '/abs'", "cgroup.subtree"),
    ("node_name = ", "not valid TOML"),
    ("login_services = ['../shadow']", "login_services: expected PAM service names"),
    ("login_services = 'sshd'", "login_services: expected a list of strings"),
    ("max_sessions = 0", "max_sessions: expected at least 1"),
    ("max_sessions = '64'", "max_sessions: expected a number of sessions"),
    ("max_sessions = 6.5", "max_sessions: expected a number of sessions"),
    ("max_sessions_per_user = 0", "max_sessions_per_user: expected at least 1"),
    ("max_sessions_per_user = true", "max_sessions_per_user: expected a number of sessions"),
    ("max_sessions_per_user = 65", "max_sessions_per_user: 65 is more than max_sessions (64)"),
    ("max_sessions = 8\nmax_sessions_per_user = 9",
     "max_sessions_per_user: 9 is more than max_sessions (8)"),
    ("session_open_timeout = 0", "session_open_timeout: expected more than 0 and at most 60"),
    ("session_open_timeout = -1", "session_open_timeout: expected more than 0 and at most 60"),
    ("session_open_timeout = 600", "session_open_timeout: expected more than 0 and at most 60"),
    ("session_open_timeout = '5s'", "session_open_timeout: expected a number of seconds"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no such configuration file"):
        config.load(tmp_path / "absent.toml")


def test_find_uses_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "port = 7100\n")
    monkeypatch.setenv(config.ENV_VAR, str(p))
    assert config.find().port == 7100
    assert config.find(str(p)).path == str(p)


def test_session_limit_defaults() -> None:
    cfg = config.parse({})
    assert (cfg.max_sessions, cfg.max_sessions_per_user, cfg.session_open_timeout) == \
        (64, 16, 5.0)
    cfg = config.parse({"max_sessions": 4})  # a smaller total lowers the default share
    assert cfg.max_sessions_per_user == 4


def test_backend_and_slurm_table(tmp_path: Path) -> None:
    assert config.load(EXAMPLE).backend == "native"       # the example keeps the default
    cfg = config.load(write(tmp_path, """
backend = "slurm"
[slurm]
slurm_conf = "/etc/slurm-llnl/slurm.conf"
spool_dir = "/var/spool/slurmd/n1"
nodename = "n1"
"""))
    assert cfg.backend == "slurm"
    assert cfg.slurm == config.SlurmConfig("/etc/slurm-llnl/slurm.conf",
                                           "/var/spool/slurmd/n1", "n1")
    assert config.AgentConfig().slurm.slurm_conf == "/etc/slurm/slurm.conf"


@pytest.mark.parametrize(("text", "error"), [
    ('backend = "pbs"', "backend: expected one of native, slurm"),
    ('backend = 1', "backend: expected one of native, slurm"),
    ('[slurm]\nspool = "/x"', "slurm.spool: unknown setting"),
    ('[slurm]\nnodename = 3', "slurm.nodename: expected a string"),
    ('slurm = 3', r"\[slurm\]: expected a table"),
])
def test_bad_backend_settings(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(config.ConfigError, match=error):
        config.load(write(tmp_path, text))


# -- nodes (issue 12): the hostlist syntax, parsed with ClusterShell's NodeSet -------------

def test_nodes_key_is_parsed_folded_and_expanded(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, 'nodes = "node[001-003],gpu[01-02], node004"\n'
                                      "locate_parallel = 4\nlocate_timeout = 0.5\n"))
    assert cfg.nodes == "gpu[01-02],node[001-004]"
    assert cfg.node_names() == ["gpu01", "gpu02", "node001", "node002", "node003", "node004"]
    assert (cfg.locate_parallel, cfg.locate_timeout) == (4, 0.5)


def test_nodes_defaults() -> None:
    cfg = config.AgentConfig()
    assert cfg.nodes == "" and cfg.node_names() == []
    assert cfg.locate_parallel == config.DEFAULT_LOCATE_PARALLEL
    assert cfg.locate_timeout == config.DEFAULT_LOCATE_TIMEOUT


def test_example_config_nodes() -> None:
    cfg = config.load(EXAMPLE)
    assert len(cfg.node_names()) == 520 and cfg.node_names()[0] == "gpu01"


@pytest.mark.parametrize("value, needle", [
    ('"node[1-"', "not a node set (missing bracket"),
    ('"node[5-1]"', "not a node set"),
    ('"a,,b"', "not a node set"),
    ('"@compute"', "expected host names and ranges"),   # groups are never resolved
    ('"node 1"', "expected host names and ranges"),
    ('"alice@node1"', "expected host names and ranges"),
    ('""', "expected a node set such as"),
    ('"node[1-70000]"', "70000 nodes, more than 65536"),
    ("5", "expected a node set"),
    ('["node1"]', "expected a node set"),
])
def test_malformed_nodes_are_one_clear_error(tmp_path: Path, value: str, needle: str) -> None:
    path = write(tmp_path, f"nodes = {value}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: nodes: ") and needle in str(e.value), e.value


@pytest.mark.parametrize("text, needle", [
    ("locate_parallel = 0", "locate_parallel: expected 1..256"),
    ("locate_parallel = 1000", "locate_parallel: expected 1..256"),
    ("locate_parallel = true", "locate_parallel: expected a number of calls"),
    ("locate_timeout = 0", "locate_timeout: expected more than 0"),
    ("locate_timeout = 61", "locate_timeout: expected more than 0"),
    ('locate_timeout = "2"', "locate_timeout: expected a number of seconds"),
])
def test_bad_locate_settings(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(config.ConfigError, match=needle):
        config.load(write(tmp_path, text + "\n"))


def test_fold_nodes_for_messages() -> None:
    assert config.fold_nodes(["node1", "node2", "node5"]) == "node[1-2,5]"
    assert config.fold_nodes([]) == ""
