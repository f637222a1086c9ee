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
from node_agent import jobshell, launch
from node_agent.errors import InvalidRequest, JobNotFound, JobStartFailed, PermissionDenied
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


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


class LiveProcsLayout(CgroupLayout):
    """The fake tree's cgroup.procs are plain files that keep the pids written into them;
    the kernel's list only live members. (Nor do children follow their parent into the
    fake files: killing a session's descendants through its cgroup is tested in the lab.)"""

    @staticmethod
    def _procs_in(top: Path) -> set[int]:
        return {p for p in CgroupLayout._procs_in(top) if _alive(p)}


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(
                int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[JobRegistry]:
    hier = (Hierarchy("freezer", 1, tmp_path / "cg" / "freezer"),
            Hierarchy("unified", 2, tmp_path / "cg" / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    reg = JobRegistry(tmp_path / "state", LiveProcsLayout(hier, "callerid"), node="n1")
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


def test_session_dir_visibility_in_a_jobs_mount_namespace(tmp_path: Path) -> None:
    d = tmp_path / "run" / "sessions" / "j1-abc"
    d.mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "10").mkdir(parents=True)
    (proc / "10" / "root").symlink_to("/")                 # the agent's own view
    (proc / "20" / "root" / d.relative_to("/")).mkdir(parents=True)   # another directory
    (proc / "30" / "root").mkdir(parents=True)             # nothing there (private tmpfs)
    assert jobshell.session_dir_visible(10, d, str(proc))
    assert not jobshell.session_dir_visible(20, d, str(proc))
    assert not jobshell.session_dir_visible(30, d, str(proc))
    assert not jobshell.session_dir_visible(40, d, str(proc))  # no such process
    assert jobshell.session_dir_visible(os.getpid(), d)


def test_session_bases() -> None:
    run = Path("/run/callerid-adopt/sessions")
    assert jobshell.session_bases(run, {}) == [str(run), "/tmp"]
    assert jobshell.session_bases(run, {"TMPDIR": "/scratch/job 42/"}) == \
        [str(run), "/scratch/job 42", "/tmp"]
    assert jobshell.session_bases(run, {"TMPDIR": "relative"}) == [str(run), "/tmp"]
    assert jobshell.session_bases(run, {"TMPDIR": "/tmp/"}) == [str(run), "/tmp"]


def _launch_spec(tmp_path: Path, bases: list[Path]) -> dict[str, object]:
    old = "/run/callerid-adopt/sessions/j1-abc"
    files = {"sshd_config": f"HostKey {old}/host_key\n", "session-setup": f"#!/bin/sh\n. {old}/e\n",
             "host_key": "secret\n"}
    view = {"dir": old, "bases": [str(b) for b in bases]}
    return {"uid": os.getuid(), "argv": ["sshd", "-f", f"{old}/sshd_config"],
            "env": {"PATH": "/bin", "NSS_WRAPPER_PASSWD": f"{old}/passwd"},
            "output": f"{old}/sshd.log",
            "session": {**view, "files": [[n, 0o700 if n == "session-setup" else 0o600, t]
                                          for n, t in files.items()]}}


def test_launcher_makes_the_session_dir_in_the_first_fitting_base(tmp_path: Path) -> None:
    """launch.py's ``session``: run here as this user, in this mount namespace."""
    missing, open_to_all, quoted, good = (tmp_path / "missing", tmp_path / "open",
                                          tmp_path / "needs quoting", tmp_path / "good")
    for b in (open_to_all, quoted, good):
        b.mkdir()
    open_to_all.chmod(0o777)                 # others could rename our directory away
    spec = _launch_spec(tmp_path, [missing, open_to_all, quoted, good, Path("/tmp")])
    launch.materialize(spec)
    d = good / "j1-abc"
    assert sorted(p.name for p in good.iterdir()) == ["j1-abc"]
    assert not any(open_to_all.iterdir()) and not any(quoted.iterdir())
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "sshd_config").read_text() == f"HostKey {d}/host_key\n"
    assert (d / "session-setup").read_text() == f"#!/bin/sh\n. {d}/e\n"
    assert stat.S_IMODE((d / "session-setup").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "host_key").stat().st_mode) == 0o600
    assert spec["argv"] == ["sshd", "-f", f"{d}/sshd_config"]
    assert spec["env"] == {"PATH": "/bin", "NSS_WRAPPER_PASSWD": f"{d}/passwd"}
    assert spec["output"] == f"{d}/sshd.log"
    open_to_all.chmod(0o1777)                # sticky, as /tmp: fits
    other = _launch_spec(tmp_path, [open_to_all, good])
    launch.materialize(other)
    assert (open_to_all / "j1-abc" / "host_key").exists()
    launch.remove(_launch_spec(tmp_path, [missing, open_to_all, quoted, good]))
    assert not any(open_to_all.iterdir()) and not any(good.iterdir())


def test_launcher_never_reuses_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "a" / "j1-abc").mkdir(parents=True)   # made by someone else: skipped
    (tmp_path / "b").mkdir()
    spec = _launch_spec(tmp_path, [tmp_path / "a", tmp_path / "b"])
    launch.materialize(spec)
    assert not any((tmp_path / "a" / "j1-abc").iterdir())
    assert (tmp_path / "b" / "j1-abc" / "sshd_config").exists()
    with pytest.raises(OSError, match="no directory for the session files"):
        launch.materialize(_launch_spec(tmp_path, [tmp_path / "a", tmp_path / "b"]))


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
    for parts in session:
        for part in parts:
            sock.sendall(part)
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


class RecordingWarmer:
    """Stands in for warmup.MigrationWarmer: records what the sessions ask of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def expect_login(self) -> None:
        self.calls.append("expect")

    def login_arrived(self) -> None:
        self.calls.append("arrived")


@pytest.mark.skipif(os.geteuid() != 0, reason="opening a session chowns its files")
def test_opening_keeps_the_migration_lock_warm_also_when_it_fails(
        registry: JobRegistry, tmp_path: Path) -> None:
    _job_without_process(registry)
    warmer = RecordingWarmer()
    sessions = JobShellSessions(registry, tmp_path / "s", "n1", sshd="/nonexistent/sshd",
                                warmer=warmer)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        sessions.open("7", 4242, False, ED_KEY, [])
    assert warmer.calls == []  # refused before anything is made: nothing to warm up
    with pytest.raises(JobStartFailed):
        sessions.open("7", 0, False, ED_KEY, [])  # sshd cannot be started
    assert warmer.calls == ["expect", "arrived"]
    assert list((tmp_path / "s").iterdir()) == []  # and the session dir is gone


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
        leaf = registry.layout.leaf_path(registry.layout.hierarchies[0], "j1",
                                         f"ssh-to-job/{session.session_id}")
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
    while time.time() < deadline and len(_tree(session.pid)) < 3:
        time.sleep(0.1)
    tree = _tree(session.pid)
    try:
        assert len(tree) >= 3      # sshd, its session child, the shell
        session.cleanup()
        t.join(20)
        assert not session.directory.exists()
        assert not _alive(session.pid)
        session.cleanup()          # idempotent
    finally:
        for pid in tree:           # the rest dies with the session's cgroup on a real node
            if _alive(pid):
                os.kill(pid, 9)


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


@pytest.mark.skipif(not REAL or shutil.which("unshare") is None,
                    reason="needs root, user alice, sshd, ssh and unshare")
def test_real_session_in_a_job_that_hides_the_session_dir(registry: JobRegistry,
                                                          shared_dir: Path,
                                                          tmp_path: Path) -> None:
    """The job's main process has its own mount namespace (in its own user namespace) with
    a private tmpfs over the agent's session directory; its $TMPDIR is on that tmpfs. The
    session's files are made there by the launcher, as alice, and removed there at the end."""
    run = shared_dir / "run"
    run.mkdir()
    private = f"mount -t tmpfs none {run} && mkdir {run}/tmp && exec sleep 300"
    registry.start("j1", "alice", ["unshare", "-Urm", "sh", "-c", private], cwd="/",
                   env={"TMPDIR": f"{run}/tmp", "PATH": "/usr/bin:/bin"})
    main = registry.get("j1").job.main_pid  # type: ignore[union-attr]
    job_tmp = Path(f"/proc/{main}/root{run}/tmp")
    deadline = time.time() + 10
    while not job_tmp.is_dir() and time.time() < deadline:
        time.sleep(0.05)
    sessions = JobShellSessions(registry, run / "sessions", "n1")
    session = sessions.open("j1", ALICE.pw_uid, False, _keypair(tmp_path),  # type: ignore
                            ["/bin/bash"])
    client = _Client(tmp_path, session)
    try:
        assert session.job_view is not None
        assert sorted(p.name for p in session.directory.iterdir()) == ["host_key",
                                                                       "host_key.pub"]
        r = client.run(f'id -un; readlink /proc/self/ns/mnt; echo "$CALLERID_JOB_ID"; '
                       f'ls {run}/tmp; test -e {run}/sessions || echo hidden')
        assert r.returncode == 0, (r.stderr, list(job_tmp.iterdir()))
        assert r.stdout.decode().splitlines() == [
            "alice", os.readlink(f"/proc/{main}/ns/mnt"), "j1", session.directory.name,
            "hidden"]
        inside = job_tmp / session.directory.name
        assert inside.stat().st_uid == ALICE.pw_uid  # type: ignore[union-attr]
        assert (inside / "sshd_config").read_text().startswith("# a private sshd -i")
        assert f"HostKey {run}/tmp/{session.directory.name}/host_key" in \
            (inside / "sshd_config").read_text()
    finally:
        session.cleanup()
    assert not session.directory.exists()
    assert list(job_tmp.iterdir()) == []
    session.cleanup()          # idempotent


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
