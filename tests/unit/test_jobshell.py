"""ssh-to-job, agent side (node_agent.agent.sessions): checks, files, and a real sshd -i over pipes.

The job runs in a fake cgroup tree (regular files; the launcher writes its pid there), so
nothing touches /sys/fs/cgroup. The end-to-end tests start the real sshd as a lab user and
the real ssh client through a ProxyCommand relay: no network is involved.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from callerid import CgroupLayout, Hierarchy
from node_agent import jobenv, launch, shellwire, spawn
from node_agent.agent import sessions as jobshell
from node_agent.agent.sessions import JobShellSessions, Session
from node_agent.errors import InvalidRequest, JobNotFound, JobStartFailed
from node_agent.jobs import native
from node_agent.jobs.native import JobRegistry

ED_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVtdmrVZmpHYDyJfdKD6WIOI1yQBmz2gWfCJHO7E1Jv "
          "me@client")


LAB_USER_GECOS = "callerid-adopt lab user"  # as deploy/lab names the users it makes


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _lab_user(name: str) -> pwd.struct_passwd | None:
    """A user of the lab's (alice, bob); made here when missing and we are root, as the
    lab makes them: `make test` runs these tests before the lab's, and a root run must
    not leave its tests out for want of a user the lab would have made."""
    user = _user(name)
    if user is None and os.geteuid() == 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-c", LAB_USER_GECOS, name],
                       check=True)
        user = pwd.getpwnam(name)
    return user


NOBODY = _user("nobody")
# Beside root (the `root` marker), the real sessions need the ssh programs (`make deps`).
needs_ssh = pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"),
                               reason="needs sshd and ssh (`make deps` installs them)")
needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")


@pytest.fixture(scope="session")
def alice() -> pwd.struct_passwd:
    """The user the real sessions run as (root tests only: made when missing)."""
    user = _lab_user("alice")
    assert user is not None, "only tests marked `root` may use the fixture alice"
    return user


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
    fake files: killing a session's descendants through its cgroup is tested in the lab.)
    rmdir on cgroupfs takes a group's control files with it and fails (EBUSY) only while
    a process is in it: the fake control files go first, unless a live pid is listed."""

    @staticmethod
    def _procs_in(top: Path) -> set[int]:
        return {p for p in CgroupLayout._procs_in(top) if _alive(p)}

    def remove(self, job_id: str, leaf: str | None = None) -> None:
        for h in self.hierarchies:
            for d in self._dirs(self._top(h, job_id, leaf)):
                if not self._procs_in(d):
                    for f in d.iterdir():
                        if f.is_file():
                            f.unlink()
        super().remove(job_id, leaf)


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


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The specs of every launcher started (spawn.start still does the work)."""
    specs: list[dict[str, object]] = []
    real = spawn.start

    def start(spec: dict[str, object], **kw: object) -> subprocess.Popen[bytes]:
        specs.append(dict(spec))
        return real(spec, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(spawn, "start", start)
    return specs


def _job_without_process(reg: JobRegistry, job_id: str = "7", user: str = "alice") -> None:
    if _lab_user(user) is None:
        pytest.skip(f"no user {user} (a root run makes it)")
    reg.start(job_id, user)


# -- checks before anything is made ----------------------------------------------------------

def test_unknown_job_and_other_user_are_refused_and_nothing_is_made(
        registry: JobRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _job_without_process(registry)
    run = tmp_path / "sessions"
    sessions = JobShellSessions(registry, run, "n1")
    with pytest.raises(JobNotFound) as missing:
        sessions.open("8", 4242, False, ED_KEY, [])
    with pytest.raises(JobNotFound) as others:     # alice's job, asked by uid 4242
        sessions.open("7", 4242, False, "not a key", ["relative"])
    # Indistinguishable: same error, same message but for the id asked about.
    assert str(missing.value) == "no job 8 on n1"
    assert str(others.value) == "no job 7 on n1"
    assert others.value.code == missing.value.code
    security = [r.getMessage() for r in caplog.records if r.name == "node_agent.security"]
    assert len(security) == 1 and security[0].startswith(
        "SECURITY: uid 4242 asked n1 for a shell in job 7 of uid ")
    assert not run.exists()
    assert not any(p.name == native.SSH_LEAF for p in (tmp_path / "cg").rglob("*"))


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
                 "Subsystem sftp internal-sftp", f"ForceCommand {tmp_path}/session-setup",
                 # ssh -L/-D into the job (ssh job.42, VS Code), nothing listening for -R
                 "AllowTcpForwarding local", "PermitListen none", "GatewayPorts no",
                 "AllowStreamLocalForwarding no", "PermitTunnel no"]:
        assert line in cfg.splitlines()
    script = jobshell.session_setup_text(tmp_path, "/work dir/x'y", "j1", [5, 3], "/bin/bash",
                                         nss_wrapper=False, node="n1")
    assert "cd '/work dir/x'\\''y'" in script
    assert f"export {jobenv.JOB_PIDS}='5 3'" in script
    assert "internal-sftp|/usr/lib/openssh/sftp-server) exec /usr/lib/openssh/sftp-server" \
        in script
    assert "LD_PRELOAD" not in script
    assert "NSS_WRAPPER_PASSWD" in jobshell.session_setup_text(tmp_path, "/", "j", [], "/bin/sh",
                                                               nss_wrapper=True, node="n1")


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
        leaf = layout.leaf_path(h, "7", native.SSH_LEAF)
        leaf.mkdir()
        (leaf / "cgroup.procs").write_text("20\n")
    assert registry.pids("7") == [10, 20, 30]
    assert JobShellSessions(registry, tmp_path / "s", "n1").job_pids("7") == [10, 30]


@pytest.mark.parametrize("shells", [
    ["bash"], ["/bin/sh", "relative/sh"], ["/bin/../bin/sh"], ["/bin/./sh"], ["/bin/sh/"],
    ["/my shell/sh"], ["/bin/sh;rm"], ["/$HOME/sh"], ["//bin/sh"], [""],
    ["/" + "s" * 256], ["/bin/sh"] * 17,
])
def test_shells_that_are_not_plain_absolute_paths_are_refused(
        registry: JobRegistry, tmp_path: Path, shells: list[str]) -> None:
    _job_without_process(registry)
    with pytest.raises(InvalidRequest, match="^shells: "):
        JobShellSessions(registry, tmp_path / "s", "n1").open("7", 1001, False, ED_KEY, shells)
    assert not (tmp_path / "s").exists()


def test_plain_shells_are_kept() -> None:
    shells = ["/bin/bash", "/opt/zsh-5.9/bin/zsh", "/usr/local/bin/fish+x", "/" + "s" * 255]
    assert shellwire.validate_shells(shells) == shells
    assert shellwire.validate_shells(["/bin/sh"] * 16) == ["/bin/sh"] * 16
    assert shellwire.validate_shells([]) == []


def test_session_setup_picks_the_first_executable_shell_as_the_user_sees_it(
        tmp_path: Path) -> None:
    """The agent never looks at the client's shells; the script does, in the session."""
    (tmp_path / "environment").write_text("")
    not_exec = tmp_path / "not-exec"
    not_exec.write_text("#!/bin/sh\n")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    fine = tmp_path / "fine-sh"
    fine.symlink_to("/bin/sh")

    def run(shells: list[str]) -> str:
        script = tmp_path / "session-setup"
        script.write_text(jobshell.session_setup_text(tmp_path, "/", "j1", [1], shells,
                                                      nss_wrapper=False, node="n1"))
        script.chmod(0o755)
        out = subprocess.run([str(script)], env={"SSH_ORIGINAL_COMMAND": 'echo "$SHELL"',
                                                 "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, check=True).stdout
        return out.strip()

    assert run(["/no/such/sh", str(not_exec), str(a_dir), str(fine), "/bin/bash"]) == str(fine)
    assert run(["/no/such/sh", str(not_exec)]) == "/bin/sh"     # as it always fell back
    assert run([]) == "/bin/sh"


def _run_setup(tmp_path: Path, *, tty: bool, command: str | None, pids: list[int],
               node: str = "node2", job_id: str = "42") -> tuple[bytes, bytes]:
    """Run a session-setup script as sshd would: stdin/stdout/stderr on a new pty (`tty`)
    or on pipes, $SSH_ORIGINAL_COMMAND set when `command` is not None; the "login shell"
    is a script that says LOGIN-SHELL. What reached stdout and stderr (on a pty, both
    read from its master: stderr is then b"")."""
    (tmp_path / "environment").write_text("")
    login = tmp_path / "login-sh"
    login.write_text('#!/bin/sh\n[ "$1" = -c ] && exec /bin/sh "$@"\necho LOGIN-SHELL\n')
    login.chmod(0o755)
    script = tmp_path / "session-setup"
    script.write_text(jobshell.session_setup_text(tmp_path, "/", job_id, pids, [str(login)],
                                                  nss_wrapper=False, node=node))
    script.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin"}
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    if not tty:
        r = subprocess.run([str(script)], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        return r.stdout, r.stderr
    master, slave = os.openpty()
    try:
        p = subprocess.Popen([str(script)], env=env, stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every end of the pty's slave is closed
                break
            if not chunk:
                break
            out += chunk
        p.wait(30)
    finally:
        os.close(master)
    return out.replace(b"\r\n", b"\n"), b""


def test_an_interactive_login_is_greeted_like_condor_ssh_to_job(tmp_path: Path) -> None:
    out, _ = _run_setup(tmp_path, tty=True, command=None, pids=[4711, 4712])
    assert out == (b"Welcome to node2!\nYour job 42 is running with pid(s) 4711 4712.\n"
                   b"LOGIN-SHELL\n")
    # a job without processes: no pids line (as HTCondor leaves it out)
    out, _ = _run_setup(tmp_path, tty=True, command=None, pids=[])
    assert out == b"Welcome to node2!\nLOGIN-SHELL\n"
    # a node or job name is data, never shell text
    out, _ = _run_setup(tmp_path, tty=True, command=None, pids=[1], node="n'$(id)%s",
                        job_id="a.0")
    assert out.splitlines()[:2] == [b"Welcome to n'$(id)%s!",
                                    b"Your job a.0 is running with pid(s) 1."]


@pytest.mark.parametrize("tty,command", [
    (False, "true"),             # ssh-to-job J true; rsync's and scp -O's commands alike
    (False, "internal-sftp"),    # sftp, and scp (sftp since OpenSSH 9)
    (False, None),               # ssh -T, no command
    (True, "true"),              # ssh -t J true: a command still
])
def test_commands_and_transfers_get_no_greeting(tmp_path: Path, tty: bool,
                                                command: str | None) -> None:
    if command == "internal-sftp" and not os.access(jobshell.SFTP_SERVER, os.X_OK):
        pytest.skip(f"no {jobshell.SFTP_SERVER}")
    out, err = _run_setup(tmp_path, tty=tty, command=command, pids=[4711])
    if command is None:   # the login shell ran, and only it spoke
        assert (out, err) == (b"LOGIN-SHELL\n", b"")
    else:                 # (sftp-server, its input at an end, exits without a word)
        assert (out, err) == (b"", b"")


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


@pytest.mark.root  # opening a session chowns its files
def test_opening_keeps_the_migration_lock_warm_also_when_it_fails(
        registry: JobRegistry, tmp_path: Path) -> None:
    _job_without_process(registry)
    warmer = RecordingWarmer()
    sessions = JobShellSessions(registry, tmp_path / "s", "n1", sshd="/nonexistent/sshd",
                                warmer=warmer)  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        sessions.open("7", 4242, False, ED_KEY, [])
    assert warmer.calls == []  # refused before anything is made: nothing to warm up
    with pytest.raises(JobStartFailed):
        sessions.open("7", 0, False, ED_KEY, [])  # sshd cannot be started
    assert warmer.calls == ["expect", "arrived"]
    assert list((tmp_path / "s").iterdir()) == []  # and the session dir is gone


def _as(user: pwd.struct_passwd, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--clear-groups", "--", *argv], capture_output=True)


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


@pytest.mark.root
@needs_ssh
def test_real_session_command_env_and_exit_status(registry: JobRegistry, shared_dir: Path,
                                                  tmp_path: Path,
                                                  alice: pwd.struct_passwd) -> None:
    sessions, session, client = _open(registry, shared_dir, tmp_path, "alice")
    d = session.directory
    try:
        # The directory is root's: alice's sshd reaches its files by name, alice can add,
        # rename or remove nothing there, and what is hers in it goes with it.
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_uid == 0
        for f in d.iterdir():
            fst = f.stat()
            assert fst.st_uid == alice.pw_uid, f
            mode = 0o700 if f.name == "session-setup" else \
                0o644 if f.name == "host_key.pub" else 0o600
            assert stat.S_IMODE(fst.st_mode) == mode, f
        for cmd in (["touch", str(d / "mine")], ["mkdir", str(d / "mine")],
                    ["mv", str(d / "sshd.log"), str(d / "moved")],
                    ["rm", "-f", str(d / "environment")]):
            assert _as(alice, cmd).returncode != 0, cmd
        assert {p.name for p in d.iterdir()} - {"passwd", "group"} == {   # nss_wrapper's
            "authorized_keys", "environment", "host_key", "host_key.pub", "session-setup",
            "sshd.log", "sshd_config"}
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


@pytest.mark.root
@needs_ssh
@pytest.mark.usefixtures("alice")
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


@pytest.mark.root
@needs_ssh
@pytest.mark.skipif(NOBODY is None or not os.path.exists(jobshell.NSS_WRAPPER),
                    reason="needs user nobody and nss_wrapper")
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


@pytest.mark.root
@needs_ssh
@pytest.mark.usefixtures("alice")
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


@pytest.mark.root
@needs_ssh
@pytest.mark.usefixtures("alice")
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


@pytest.mark.root
@needs_ssh
@needs_unshare
def test_real_session_in_a_job_that_hides_the_session_dir(registry: JobRegistry,
                                                          shared_dir: Path, tmp_path: Path,
                                                          spawned: list[dict[str, object]],
                                                          alice: pwd.struct_passwd) -> None:
    """The job's main process has its own mount namespace (in its own user namespace) with
    a private tmpfs over the agent's session directory; its $TMPDIR is on that tmpfs. The
    session's files are made there by the launcher, as alice, and removed there at the end,
    by a helper in the session's own cgroup (the job still runs)."""
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
    session = sessions.open("j1", alice.pw_uid, False, _keypair(tmp_path), ["/bin/bash"])
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
        assert inside.stat().st_uid == alice.pw_uid
        assert (inside / "sshd_config").read_text().startswith("# a private sshd -i")
        assert f"HostKey {run}/tmp/{session.directory.name}/host_key" in \
            (inside / "sshd_config").read_text()
    finally:
        session.cleanup()
    assert not session.directory.exists()
    assert list(job_tmp.iterdir()) == []
    sid = native.session_leaf(session.session_id)
    leaf = [str(registry.layout.leaf_path(h, "j1", sid) / "cgroup.procs")
            for h in registry.layout.hierarchies]
    assert [(x["cgroup_procs"], bool(x.get("remove"))) for x in spawned if "session" in x] \
        == [(leaf, False), (leaf, True)]    # sshd, then the clean-up helper
    session.cleanup()          # idempotent
    assert len(spawned) == 3   # the job's main process, sshd, the clean-up helper
    assert not any(p.name == session.session_id for p in (tmp_path / "cg").rglob("*"))


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


@pytest.mark.root
@needs_ssh
@needs_unshare
def test_cleanup_after_the_job_ended_runs_in_a_transient_cgroup(
        registry: JobRegistry, shared_dir: Path, tmp_path: Path,
        spawned: list[dict[str, object]], alice: pwd.struct_passwd) -> None:
    """The job hides only /run: the session's files are in the node's /tmp. The job ends
    while the session runs; its cgroups are gone, so the clean-up helper runs in a cgroup
    of its own, below the agent's subtree but not where jobs live, removed after it."""
    run = shared_dir / "run"
    run.mkdir()
    registry.start("j1", "alice", ["unshare", "-Urm", "sh", "-c",
                                   f"mount -t tmpfs none {run} && exec sleep 300"],
                   cwd="/", env={"PATH": "/usr/bin:/bin"})
    main = registry.get("j1").job.main_pid  # type: ignore[union-attr]
    deadline = time.time() + 10
    while os.readlink(f"/proc/{main}/exe") != "/usr/bin/sleep" and time.time() < deadline:
        time.sleep(0.05)
    session = JobShellSessions(registry, run / "sessions", "n1").open(
        "j1", alice.pw_uid, False, ED_KEY, [])
    in_tmp = Path("/tmp") / session.directory.name
    try:
        assert session.job_view is not None and (in_tmp / "sshd_config").exists()
        registry.end("j1")
        out = b""
        while parts := session.read():       # (its banner, if it had the time to send it)
            out += b"".join(parts)
        assert out in (b"",) or out.startswith(b"SSH-2.0-"), out   # then EOF: sshd died
        assert not registry.layout.existing_jobs()
    finally:
        session.cleanup()
    assert not in_tmp.exists()
    helpers = registry.helper_layout()
    transient = [str(helpers.leaf_path(h, session.session_id, native.CLEANUP_LEAF) /
                     "cgroup.procs") for h in helpers.hierarchies]
    assert [x["cgroup_procs"] for x in spawned if x.get("remove")] == [transient]
    assert not any(p.name.startswith("job_") for h in helpers.hierarchies
                   for p in helpers.subtree_path(h).iterdir())     # removed after it
    assert not registry.layout.existing_jobs()  # and nothing looks like a job


@pytest.mark.root  # the helper drops privileges (setgroups)
def test_a_helper_past_its_timeout_is_killed_with_its_whole_cgroup(
        registry: JobRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything in the helper's cgroup dies, not only the process the agent started."""
    layout = registry.helper_layout()
    where = jobshell._HelperCgroup(registry.helper_cgroup("abc"), transient=True)
    bystander = subprocess.Popen(["sleep", "60"])
    real = spawn.start

    def start(spec: dict[str, object], **kw: object) -> subprocess.Popen[bytes]:
        proc = real(spec, **kw)  # type: ignore[arg-type]
        for f in spec["cgroup_procs"]:  # type: ignore[attr-defined]
            with open(f, "a") as out:   # as if the helper had started it
                out.write(f"\n{bystander.pid}\n")  # the launcher wrote no newline
        return proc

    monkeypatch.setattr(spawn, "start", start)
    view = jobshell.JobViewDir(tmp_path, [], "/proc/self/ns/mnt", os.getuid(), os.getgid(),
                               [], jobs=registry, job_id="7", session_id="abc",
                               job_running=lambda: False)
    spec = {"namespaces": [], "uid": os.getuid(), "gid": os.getgid(), "groups": [],
            "cwd": "/", "argv": ["sleep", "60"], "env": {"PATH": "/usr/bin:/bin"},
            "output": os.devnull}
    try:
        assert view._run(spec, view._fd, where, timeout=0.5) is True
        assert bystander.wait(10) == -signal.SIGKILL
        assert "removal took over 0.5s: its cgroup" in caplog.text
        assert not layout.existing_jobs()
    finally:
        if bystander.poll() is None:
            bystander.kill()
            bystander.wait()
        os.close(view._fd)


@pytest.fixture
def launchers(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """The launcher processes spawn.start makes from now on (not another test's
    ssh-keygen thread's, which may start meanwhile)."""
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(*a: object, **kw: object) -> subprocess.Popen[bytes]:
        p: subprocess.Popen[bytes] = real(*a, **kw)  # type: ignore[call-overload]
        if launch.__file__ in list(a[0]):  # type: ignore[call-overload]  # argv
            started.append(p)
        return p

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def test_a_launcher_that_never_gets_to_exec_is_killed_after_the_timeout(
        tmp_path: Path, launchers: list[subprocess.Popen[bytes]]) -> None:
    """Here it blocks opening its cgroup.procs (a FIFO nobody reads); as the user, before
    exec, the job's user could also SIGSTOP it."""
    fifo = tmp_path / "cgroup.procs"
    os.mkfifo(fifo)
    spec = {"cgroup_procs": [str(fifo)], "uid": os.getuid(), "gid": os.getgid(),
            "groups": [], "cwd": "/", "argv": ["true"], "env": {}, "output": os.devnull}
    with pytest.raises(spawn.LaunchError, match="did not get to exec within 0.5 s"):
        spawn.start(spec, timeout=0.5)
    assert launchers[0].returncode == -signal.SIGKILL      # killed and reaped


def _touch_spec(procs: Path, mark: Path) -> dict[str, object]:
    return {"cgroup_procs": [str(procs)], "uid": os.getuid(), "gid": os.getgid(),
            "groups": [], "cwd": "/", "argv": ["touch", str(mark)],
            "env": {"PATH": spawn.LOGIN_PATH}, "output": os.devnull}


def test_the_launcher_is_enrolled_while_held_before_it_touches_anything(
        tmp_path: Path) -> None:
    """spawn.start's ``enroll`` (Slurm's REQUEST_ADD_EXTERN_PID) sees the launcher's pid
    before the launcher has joined its cgroups or run anything."""
    procs, mark = tmp_path / "cgroup.procs", tmp_path / "ran"
    procs.write_text("")
    seen: list[tuple[int, str, bool]] = []

    def enroll(pid: int) -> None:
        time.sleep(0.2)   # a held launcher does not go on by itself meanwhile
        seen.append((pid, procs.read_text(), mark.exists()))

    proc = spawn.start(_touch_spec(procs, mark), timeout=30, enroll=enroll)
    assert proc.wait(30) == 0
    assert seen == [(proc.pid, "", False)]
    assert procs.read_text() == str(proc.pid) and mark.exists()


def test_a_launcher_that_cannot_be_enrolled_is_killed_unreleased(
        tmp_path: Path, launchers: list[subprocess.Popen[bytes]]) -> None:
    procs, mark = tmp_path / "cgroup.procs", tmp_path / "ran"
    procs.write_text("")
    def enroll(pid: int) -> None:
        raise OSError("slurmstepd refused pid")

    with pytest.raises(OSError, match="slurmstepd refused"):
        spawn.start(_touch_spec(procs, mark), timeout=30, enroll=enroll)
    assert launchers[0].returncode is not None                 # reaped
    assert procs.read_text() == "" and not mark.exists()    # joined nothing, ran nothing


def test_a_reaper_launcher_ends_the_whole_tree_with_its_process(tmp_path: Path) -> None:
    """``reaper``: what the exec'd process started -- in the background, after setsid,
    after a double fork -- is killed when it exits; the status is the exec'd process's."""
    pids = tmp_path / "pids"
    script = (f"sleep 300 & echo $! >> {pids}; setsid sleep 300 & echo $! >> {pids}; "
              f"(setsid sh -c 'echo $$ >> {pids}; exec sleep 300' &); "
              f"while [ $(wc -l < {pids}) -lt 3 ]; do sleep 0.05; done; exit 5")
    spec = {"cgroup_procs": [], "reaper": True, "uid": os.getuid(), "gid": os.getgid(),
            "groups": [], "cwd": "/", "argv": ["sh", "-c", script],
            "env": {"PATH": spawn.LOGIN_PATH}, "output": os.devnull}
    proc = spawn.start(spec, timeout=30)
    assert proc.wait(30) == 5
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in started) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in started if Path(f"/proc/{p}").exists() and "Z" not in _state(p)] == []


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return text[text.rfind(")") + 2:].split()[0]


def test_recover_removes_what_an_earlier_run_left(registry: JobRegistry, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """After a crash: session directories (an older agent's were the user's, with
    whatever the user put there), the sessions' leaves of live jobs and what still runs
    in them, and transient clean-up cgroups."""
    caplog.set_level(logging.INFO, "node_agent.agent.sessions")
    _job_without_process(registry)
    run = tmp_path / "sessions"
    (run / "7-0123456789abcdef" / "sub").mkdir(parents=True)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("not the session's")
    (run / "7-0123456789abcdef" / "link").symlink_to(keep)
    (run / "7-0123456789abcdef" / "host_key").write_text("x")
    (run / "stray").write_text("x")
    run.chmod(0o777)
    layout = registry.layout
    helpers = registry.helper_layout()
    helpers.create_job("fedcba9876543210", leaves=(native.CLEANUP_LEAF,))
    orphans = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    layout.create_job("7", leaves=(native.session_leaf("0123456789abcdef"),))
    for h in layout.hierarchies:
        (layout.leaf_path(h, "7", native.session_leaf("0123456789abcdef")) /
         "cgroup.procs").write_text(f"{orphans[0].pid}\n")
    for h in helpers.hierarchies:
        (helpers.leaf_path(h, "fedcba9876543210", native.CLEANUP_LEAF) /
         "cgroup.procs").write_text(f"{orphans[1].pid}\n")
    try:
        JobShellSessions(registry, run, "n1").recover()
        assert [p.wait(10) for p in orphans] == [-signal.SIGKILL] * 2
    finally:
        for p in orphans:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert list(run.iterdir()) == []
    assert stat.S_IMODE(run.stat().st_mode) == 0o711
    assert (keep / "file").read_text() == "not the session's"
    for h in layout.hierarchies:
        assert not layout.leaf_path(h, "7", native.SSH_LEAF).exists()
        assert layout.leaf_path(h, "7").is_dir()      # the job itself is not touched
    assert not helpers.existing_jobs()
    assert layout.existing_jobs() == {"7"}
    assert "2 session directories, the sessions of 1 jobs, 2 processes killed" in caplog.text


@pytest.mark.root
@needs_ssh
def test_open_never_looks_at_the_clients_shells(registry: JobRegistry, shared_dir: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                alice: pwd.struct_passwd) -> None:
    """No stat, access or open of a client's shell path by the agent (root): only the
    session's own script looks, as the user, in the job's view. A root-only executable
    listed first is then skipped as it would be in any login of the user's."""
    hidden = shared_dir / "root-only"
    hidden.mkdir(mode=0o700)
    shutil.copy("/bin/sh", hidden / "sh")
    shells = ["/no/such/shell", str(hidden / "sh"), "/usr/bin/bash"]  # not alice's passwd shell
    looked: list[str] = []

    def spy(real: object) -> object:
        def wrapper(path: object, *a: object, **kw: object) -> object:
            looked.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike))
                          else str(path))
            return real(path, *a, **kw)  # type: ignore[operator]
        return wrapper

    (shared_dir / "cwd").mkdir()
    _start_job(registry, "alice", shared_dir / "cwd")
    key = _keypair(tmp_path)
    for name in ("stat", "lstat", "access", "open"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    session = JobShellSessions(registry, shared_dir / "sessions", "n1").open(
        "j1", alice.pw_uid, False, key, shells)
    monkeypatch.undo()
    try:
        assert looked, "the spy saw nothing at all"
        assert not [p for p in looked if any(p.startswith(sh) for sh in shells)]
        r = _Client(tmp_path, session).run('readlink /proc/$$/exe; echo "$SHELL"')
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == ["/usr/bin/bash"] * 2
    finally:
        session.cleanup()


# -- the launcher in a mount namespace the job controls ------------------------------------

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def hostile_stdlib(shared_dir: Path,
                   alice: pwd.struct_passwd) -> Iterator[tuple[int, Path, Path]]:
    """A mount namespace as a hostile job makes one: the standard library's directory is
    a tmpfs where every top-level module and package is a stub that records its import
    (and whose rmtree does nothing); ``base`` is a private tmpfs there, holding a session
    directory of alice's. Yields (pid holding the namespace, base, marks directory).
    Root only (the tests that use it are marked), with unshare."""
    marks = shared_dir / "marks"
    marks.mkdir()
    marks.chmod(0o1777)
    keep = shared_dir / "keep"                      # alice's, outside the session dir
    keep.mkdir()
    (keep / "file").write_text("keep me")
    os.chown(keep, alice.pw_uid, alice.pw_gid)
    os.chown(keep / "file", alice.pw_uid, alice.pw_gid)
    base = shared_dir / "base"
    base.mkdir()
    stub = f"open({str(marks)!r} + '/' + __name__, 'w').close()\ndef rmtree(*a, **k): pass\n"
    modules = sorted({e.name[:-3] for e in os.scandir(STDLIB) if e.name.endswith(".py")} |
                     {e.name for e in os.scandir(STDLIB)
                      if e.is_dir() and (Path(e.path) / "__init__.py").exists()})
    (shared_dir / "stub.py").write_text(stub)
    (shared_dir / "modules").write_text("\n".join(modules) + "\n")
    d = f"{base}/j1-0123456789abcdef"
    script = f"""set -e
mount -t tmpfs -o mode=755 none {STDLIB}
while read m; do
    mkdir -p {STDLIB}/$m && cp {shared_dir}/stub.py {STDLIB}/$m/__init__.py
    cp {shared_dir}/stub.py {STDLIB}/$m.py
done < {shared_dir}/modules
mount -t tmpfs none {base}
mkdir -p {d}/sub/deeper
touch {d}/host_key {d}/sub/f {d}/sub/deeper/g
ln -s {keep} {d}/link
ln -s {keep}/file {d}/sub/flink
chown -R {alice.pw_uid}:{alice.pw_gid} {d}
echo ready
exec sleep 120
"""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        assert Path(f"/proc/{holder.pid}/root{STDLIB}/shutil.py").read_text() == stub
        yield holder.pid, base, marks
    finally:
        holder.kill()
        holder.wait()
    assert (keep / "file").read_text() == "keep me"


def _launcher_spec(pid: int, procs: Path, **more: object) -> dict[str, object]:
    alice = pwd.getpwnam("alice")  # there: hostile_stdlib needs it
    return {"cgroup_procs": [str(procs)], "namespaces": [f"/proc/{pid}/ns/mnt"],
            "uid": alice.pw_uid, "gid": alice.pw_gid, "groups": [alice.pw_gid], **more}


@pytest.mark.root
@needs_unshare
def test_the_removal_helper_imports_nothing_in_the_jobs_namespace(
        hostile_stdlib: tuple[int, Path, Path], tmp_path: Path) -> None:
    pid, base, marks = hostile_stdlib
    procs = tmp_path / "cgroup.procs"
    spec = _launcher_spec(pid, procs, remove=True, session={
        "dir": "/run/callerid-adopt/sessions/j1-0123456789abcdef", "bases": [str(base)]})
    proc = spawn.start(spec)
    assert proc.wait(30) == 0
    assert sorted(os.listdir(marks)) == []               # none of the job's code ran
    assert procs.read_text() == str(proc.pid)            # in its cgroup before anything
    assert os.listdir(f"/proc/{pid}/root{base}") == []   # removed, links not followed


@pytest.mark.root
@needs_unshare
def test_the_sshd_launcher_imports_nothing_in_the_jobs_namespace(
        hostile_stdlib: tuple[int, Path, Path], tmp_path: Path) -> None:
    """The session path: make the files in the job's view, then exec (found in PATH)."""
    pid, base, marks = hostile_stdlib
    old = "/run/callerid-adopt/sessions/j1-fedcba9876543210"
    spec = _launcher_spec(
        pid, tmp_path / "cgroup.procs", cwd="/", env={"PATH": "/usr/bin:/bin"},
        argv=["sh", "-c", f'test "$(cat {old}/sshd_config)" = "HostKey {old}/host_key"'],
        output=f"{old}/sshd.log",
        session={"dir": old, "bases": [str(base)],
                 "files": [["sshd_config", 0o600, f"HostKey {old}/host_key"]]})
    proc = spawn.start(spec)
    assert proc.wait(30) == 0
    assert sorted(os.listdir(marks)) == []
    assert Path(f"/proc/{pid}/root{base}/j1-fedcba9876543210/sshd_config").read_text() == \
        f"HostKey {base}/j1-fedcba9876543210/host_key"


@pytest.mark.root
@needs_unshare
def test_a_forgotten_import_after_setns_fails_instead_of_running(
        hostile_stdlib: tuple[int, Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher with a lazy import on its path (as os.execvpe's ``warnings``): refused."""
    pid, base, marks = hostile_stdlib
    patched = tmp_path / "launch.py"
    text = Path(launch.__file__).read_text()
    assert "def materialize(spec: dict[str, Any]) -> None:\n" in text
    patched.write_text(text.replace("def materialize(spec: dict[str, Any]) -> None:\n",
                                    "def materialize(spec: dict[str, Any]) -> None:\n"
                                    "    import shutil  # noqa\n"))
    monkeypatch.setattr(launch, "__file__", str(patched))
    old = "/run/callerid-adopt/sessions/j1-aaaaaaaaaaaaaaaa"
    spec = _launcher_spec(pid, tmp_path / "cgroup.procs", cwd="/", env={"PATH": "/bin"},
                          argv=["true"], output=f"{old}/log",
                          session={"dir": old, "bases": [str(base)], "files": []})
    with pytest.raises(spawn.LaunchError, match="ModuleNotFoundError: No module named 'shutil'"):
        spawn.start(spec)
    assert sorted(os.listdir(marks)) == []


def test_host_keys_are_made_ahead_and_each_handed_out_once(tmp_path: Path) -> None:
    made: list[Path] = []

    def make(d: Path) -> None:
        n = len(made)
        made.append(d)
        (d / "host_key").write_text(f"private {n}\n")
        (d / "host_key.pub").write_text(f"ssh-ed25519 public{n} c\n")

    keys = jobshell.HostKeys(make, stock=2, pause=0)
    assert keys.take() is None      # nothing made before the first session asks
    deadline = time.monotonic() + 30
    taken: list[tuple[str, str]] = []
    while len(taken) < 5:
        pair = keys.take()
        if pair is None:
            assert time.monotonic() < deadline, "no key was made ahead"
            time.sleep(0.01)
            continue
        taken.append(pair)
    assert len(set(taken)) == 5     # never the same pair twice
    assert all(priv.startswith("private ") and pub.startswith("ssh-ed25519 ")
               for priv, pub in taken)
    assert not any(d.exists() for d in made)   # only in memory once made
