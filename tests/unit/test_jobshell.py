"""ssh-to-job, agent side (node_agent.jobshell): checks, files, and a real sshd -i over pipes.

The job runs in a fake cgroup tree (regular files; the launcher writes its pid there), so
nothing touches /sys/fs/cgroup. The end-to-end tests start the real sshd as a lab user and
the real ssh client through a ProxyCommand relay: no network is involved.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid import CgroupLayout, Hierarchy
from node_agent import jobshell
from node_agent.errors import InvalidRequest, JobNotFound, PermissionDenied
from node_agent.jobshell import JobShellSessions, Session
from node_agent.registry import JobRegistry

ED_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVtdmrVZmpHYDyJfdKD6WIOI1yQBmz2gWfCJHO7E1Jv "
          "me@client")


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


ALICE = _user("alice")
NOBODY = _user("nobody")
REAL = (os.geteuid() == 0 and ALICE is not None and os.path.exists("/usr/sbin/sshd")
        and shutil.which("ssh") is not None)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory job users can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="jobshell-test-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[JobRegistry]:
    hier = (Hierarchy("freezer", 1, tmp_path / "cg" / "freezer"),
            Hierarchy("unified", 2, tmp_path / "cg" / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    reg = JobRegistry(tmp_path / "state", CgroupLayout(hier, "callerid"), node="n1")
    reg.start_watcher()
    yield reg
    for rec in reg.list_jobs():
        if rec.job.main_pid:
            try:
                os.kill(rec.job.main_pid, 9)
            except ProcessLookupError:
                pass
    reg.close()


def _job_without_process(reg: JobRegistry, job_id: str = "7", user: str = "alice") -> None:
    if _user(user) is None:
        pytest.skip(f"no user {user}")
    reg.start(job_id, user)


# -- checks before anything is made ----------------------------------------------------------

def test_unknown_job_and_other_user_are_refused_and_nothing_is_made(
        registry: JobRegistry, tmp_path: Path) -> None:
    _job_without_process(registry)
    run = tmp_path / "sessions"
    sessions = JobShellSessions(registry, run, "n1")
    with pytest.raises(JobNotFound):
        sessions.open("nope", 0, False, ED_KEY, [])
    with pytest.raises(PermissionDenied, match="belongs to alice"):
        sessions.open("7", 4242, False, ED_KEY, [])
    assert not run.exists()
    assert not any(p.name == jobshell.SSH_LEAF for p in (tmp_path / "cg").rglob("*"))


@pytest.mark.parametrize("key", [
    "", "ssh-ed25519", "ssh-foo AAAAC3NzaC1lZDI1NTE5AAAAIGVt",
    "ssh-ed25519 not*base64", ED_KEY + "\nssh-ed25519 AAAA",
    "ssh-rsa " + ED_KEY.split()[1],          # body of another type
])
def test_bad_public_keys_are_refused(registry: JobRegistry, tmp_path: Path, key: str) -> None:
    _job_without_process(registry)
    with pytest.raises(InvalidRequest):
        JobShellSessions(registry, tmp_path / "s", "n1").open("7", 1001, False, key, [])
    assert not (tmp_path / "s").exists()


def test_good_public_key_is_kept() -> None:
    assert jobshell.validate_public_key("  " + ED_KEY + "\n") == ED_KEY


# -- file contents -----------------------------------------------------------------------------

def test_config_and_setup_script(tmp_path: Path) -> None:
    cfg = jobshell.sshd_config_text(tmp_path)
    for line in [f"HostKey {tmp_path}/host_key", f"AuthorizedKeysFile {tmp_path}/authorized_keys",
                 "StrictModes no", "UsePAM no", "PidFile none", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "PermitTTY yes",
                 "Subsystem sftp internal-sftp", f"ForceCommand {tmp_path}/session-setup"]:
        assert line in cfg.splitlines()
    script = jobshell.session_setup_text(tmp_path, "/work dir/x'y", "j1", [5, 3], "/bin/bash",
                                         nss_wrapper=False)
    assert "cd '/work dir/x'\\''y'" in script
    assert "export CALLERID_JOB_PIDS='5 3'" in script
    assert "internal-sftp|/usr/lib/openssh/sftp-server) exec /usr/lib/openssh/sftp-server" \
        in script
    assert "LD_PRELOAD" not in script
    assert "NSS_WRAPPER_PASSWD" in jobshell.session_setup_text(tmp_path, "/", "j", [], "/bin/sh",
                                                               nss_wrapper=True)


def test_env_file_round_trips_tricky_values(tmp_path: Path) -> None:
    env = {"A": "plain", "Q": "it's \"quoted\" $HOME `x` \\ ;", "NL": "line1\nline2\n",
           "SP": "  lead and trail  ", "EMPTY": "", "U": "\u00e9\u4e2d",
           "SSH_CONNECTION": "not from the job", "bad-name": "x", "TERM": "dumb"}
    f = tmp_path / "environment"
    f.write_text(jobshell.env_file_text(env))
    out = subprocess.run(["/bin/sh", "-c", f". {f} && env -0"], env={}, check=True,
                         capture_output=True).stdout
    got = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    for name in ("A", "Q", "NL", "SP", "EMPTY", "U"):
        assert got[name] == env[name]
    assert "SSH_CONNECTION" not in got and "TERM" not in got and "bad-name" not in got


def test_namespace_decision(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in ("self", "10", "20"):
        (proc / pid / "ns").mkdir(parents=True)
    for kind in ("mnt", "pid", "net"):
        (proc / "self" / "ns" / kind).write_text("")
        os.link(proc / "self" / "ns" / kind, proc / "10" / "ns" / kind)   # same namespaces
        (proc / "20" / "ns" / kind).write_text("")                         # all different
    os.unlink(proc / "20" / "ns" / "pid")
    os.link(proc / "self" / "ns" / "pid", proc / "20" / "ns" / "pid")
    assert jobshell.namespaces_to_enter(10, str(proc)) == []
    assert jobshell.namespaces_to_enter(20, str(proc)) == [f"{proc}/20/ns/net",
                                                           f"{proc}/20/ns/mnt"]
    assert jobshell.namespaces_to_enter(os.getpid()) == []


def test_job_pids_leave_out_session_processes(registry: JobRegistry, tmp_path: Path) -> None:
    _job_without_process(registry)
    layout = registry.layout
    for h in layout.hierarchies:
        (layout.leaf_path(h, "7") / "cgroup.procs").write_text("30\n10\n")
        leaf = layout.leaf_path(h, "7", jobshell.SSH_LEAF)
        leaf.mkdir()
        (leaf / "cgroup.procs").write_text("20\n")
    assert registry.pids("7") == [10, 20, 30]
    assert JobShellSessions(registry, tmp_path / "s", "n1").job_pids("7") == [10, 30]


def test_choose_shell(tmp_path: Path) -> None:
    assert jobshell.choose_shell(["/no/such", "bash", "/bin/sh"]) == "/bin/sh"
    assert jobshell.choose_shell([str(tmp_path)]) == "/bin/sh"
    assert jobshell.choose_shell([]) == "/bin/sh"


# -- real sshd -i over pipes ---------------------------------------------------------------

_RELAY = r"""
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def up():
    while d := os.read(0, 65536):
        s.sendall(d)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while d := s.recv(65536):
    os.write(1, d)
"""


def _pump(sock: socket.socket, session: Session) -> None:
    def up() -> None:
        try:
            while data := sock.recv(65536):
                session.write(data)
        except OSError:
            pass
        session.close_stdin()

    t = threading.Thread(target=up, daemon=True)
    t.start()
    for chunk in session:
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    t.join(5)


class _Client:
    """The real ssh client, reaching a session through a ProxyCommand relay."""

    def __init__(self, d: Path, session: Session) -> None:
        self.d, self.session = d, session
        (d / "known_hosts").write_text(f"job {session.host_key}\n")
        (d / "relay.py").write_text(_RELAY)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(d / "sock"))
        self.listener.listen(1)

    def public_key(self) -> str:
        return (self.d / "id.pub").read_text()

    def run(self, *remote: str, ssh: str = "ssh") -> subprocess.CompletedProcess[bytes]:
        d = self.d
        opts = ["-F", "/dev/null", "-i", str(d / "id"), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={d}/known_hosts",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ProxyCommand={sys.executable} {d}/relay.py {d}/sock",
                "-o", f"User={self.session.user}"]
        threading.Thread(target=self._serve, daemon=True).start()
        cmd = [ssh, *opts, *remote] if ssh != "ssh" else [ssh, *opts, "job", *remote]
        return subprocess.run(cmd, capture_output=True, timeout=60)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            _pump(conn, self.session)


def _start_job(reg: JobRegistry, user: str, cwd: Path) -> None:
    os.chown(cwd, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    reg.start("j1", user, ["sleep", "300"], cwd=str(cwd),
              env={"MY_VAR": "it's a \"value\"", "PATH": "/usr/bin:/bin"})


def _open(reg: JobRegistry, shared_dir: Path, client_dir: Path,
          user: str) -> tuple[JobShellSessions, Session, _Client]:
    (shared_dir / "cwd").mkdir()
    _start_job(reg, user, shared_dir / "cwd")
    sessions = JobShellSessions(reg, shared_dir / "sessions", "n1")
    session = sessions.open("j1", pwd.getpwnam(user).pw_uid, False, _keypair(client_dir),
                            ["/bin/bash"])
    return sessions, session, _Client(client_dir, session)


def _keypair(d: Path) -> str:
    """A client key pair d/id, d/id.pub; the public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")],
                   check=True)
    return (d / "id.pub").read_text()


@pytest.mark.skipif(not REAL, reason="needs root, user alice, sshd and ssh")
def test_real_session_command_env_and_exit_status(registry: JobRegistry, shared_dir: Path,
                                                  tmp_path: Path) -> None:
    sessions, session, client = _open(registry, shared_dir, tmp_path, "alice")
    d = session.directory
    try:
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == ALICE.pw_uid  # type: ignore
        assert (d / "authorized_keys").read_text() == client.public_key()
        assert session.host_key.startswith("ssh-ed25519 ")
        leaf = registry.layout.leaf_path(registry.layout.hierarchies[0], "j1", "ssh-to-job")
        assert str(session.pid) in (leaf / "cgroup.procs").read_text()
        r = client.run('echo hi; pwd; id -un; echo "$MY_VAR"; echo "$CALLERID_JOB_ID";'
                       ' echo "$CALLERID_JOB_PIDS"; exit 7')
        assert r.returncode == 7, r.stderr
        main = registry.get("j1").job.main_pid  # type: ignore[union-attr]
        assert r.stdout.decode().splitlines() == [
            "hi", str(shared_dir / "cwd"), "alice", "it's a \"value\"", "j1", str(main)]
        print((d / "sshd.log").read_text())
        assert session.wait(10) in (0, 255)     # 255: sshd -i saw the client close
    finally:
        session.cleanup()
    assert not d.exists()


@pytest.mark.skipif(not REAL, reason="needs root, user alice, sshd and ssh")
def test_real_sftp_and_scp(registry: JobRegistry, shared_dir: Path, tmp_path: Path) -> None:
    sessions, session, client = _open(registry, shared_dir, tmp_path, "alice")
    try:
        (tmp_path / "batch").write_text("put /etc/hostname up.txt\nls\n")
        r = client.run("-b", str(tmp_path / "batch"), "job", ssh="sftp")
        assert r.returncode == 0, r.stderr
        assert (shared_dir / "cwd" / "up.txt").read_bytes() == Path("/etc/hostname").read_bytes()
    finally:
        session.cleanup()
    _, session2, client2 = _open_again(registry, shared_dir, tmp_path)
    try:
        r = client2.run("job:up.txt", str(tmp_path / "down.txt"), ssh="scp")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "down.txt").read_bytes() == Path("/etc/hostname").read_bytes()
    finally:
        session2.cleanup()


def _open_again(reg: JobRegistry, shared_dir: Path,
                tmp_path: Path) -> tuple[JobShellSessions, Session, _Client]:
    cdir = tmp_path / "c2"
    cdir.mkdir()
    sessions = JobShellSessions(reg, shared_dir / "sessions", "n1")
    session = sessions.open("j1", 0, True, _keypair(cdir), [])   # root, as admin
    return sessions, session, _Client(cdir, session)


@pytest.mark.skipif(not REAL or NOBODY is None or not os.path.exists(jobshell.NSS_WRAPPER),
                    reason="needs root, nobody, sshd, ssh and nss_wrapper")
def test_real_session_for_a_nologin_user_uses_nss_wrapper(registry: JobRegistry,
                                                          shared_dir: Path,
                                                          tmp_path: Path) -> None:
    sessions, session, client = _open(registry, shared_dir, tmp_path, "nobody")
    d = session.directory
    try:
        assert "nobody:x:65534:65534:ssh-to-job user:" in (d / "passwd").read_text()
        r = client.run("echo $SHELL; exit 3")
        assert r.returncode == 3, r.stderr
        assert r.stdout == b"/bin/bash\n"
    finally:
        session.cleanup()
    assert not d.exists()


@pytest.mark.skipif(not REAL, reason="needs root, user alice, sshd and ssh")
def test_cleanup_kills_a_running_session_and_tolerates_a_dead_sshd(
        registry: JobRegistry, shared_dir: Path, tmp_path: Path) -> None:
    sessions, session, client = _open(registry, shared_dir, tmp_path, "alice")
    result: list[subprocess.CompletedProcess[bytes]] = []
    t = threading.Thread(target=lambda: result.append(client.run("sleep 300")), daemon=True)
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and len(session._tree()) < 3:
        time.sleep(0.1)
    tree = session._tree()
    assert len(tree) >= 3      # sshd, its session child, the shell
    session.cleanup()
    t.join(20)
    assert not session.directory.exists()
    for pid in tree:
        assert not os.path.exists(f"/proc/{pid}") or \
            Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    session.cleanup()          # idempotent


@pytest.mark.skipif(not REAL, reason="needs root, user alice, sshd and ssh")
def test_real_session_with_a_pty(registry: JobRegistry, shared_dir: Path,
                                 tmp_path: Path) -> None:
    """sshd (not root) must chown the pty to the tty group; where /dev/pts does not give
    new ptys that group the agent hides it through nss_wrapper (devpts_gives_tty_group)."""
    sessions, session, client = _open(registry, shared_dir, tmp_path, "alice")
    try:
        r = client.run("-tt", "tty; exit 5")
        assert r.returncode == 5, (r.stderr, (session.directory / "sshd.log").read_text())
        assert r.stdout.startswith(b"/dev/pts/")
    finally:
        session.cleanup()


def test_devpts_tty_group_decision(tmp_path: Path) -> None:
    import grp
    try:
        gid = grp.getgrnam("tty").gr_gid
    except KeyError:
        pytest.skip("no tty group")
    (tmp_path / "1").mkdir()
    line = "26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,{}mode=620,ptmxmode=000\n"
    (tmp_path / "1" / "mountinfo").write_text(line.format(f"gid={gid},"))
    assert jobshell.devpts_gives_tty_group(1, str(tmp_path))
    (tmp_path / "1" / "mountinfo").write_text(line.format(""))
    assert not jobshell.devpts_gives_tty_group(1, str(tmp_path))
