"""The agent side of ssh-to-job: a private `sshd -i` inside a running job.

For each session the agent makes a private directory holding a fresh host key, an
``authorized_keys`` with only the client's key, an sshd config and a ``session-setup``
script that sshd runs as ``ForceCommand``. It then starts
``sshd -i -f <dir>/sshd_config -e`` through the launcher (`node_agent.launch`): as the
job's user, in the job's cgroups (a leaf of its own, ``ssh-to-job/<session id>``), in the
job's namespaces when they differ from the agent's, with stdin/stdout as pipes to the
agent. No socket is involved: the ssh byte stream is relayed by the caller (the gRPC
servicer) through :meth:`Session.write` / :meth:`Session.read`. When the session ends
(the client went away, Ctrl-C, sshd exited), everything in its leaf is killed -- also
what left sshd's process tree (nohup, setsid, a double fork) -- and the leaf removed; the
rest of the job is not touched. ``adoptctl job end`` kills the job's sessions with it.

The directory (``<session_dir>/<job>-<session id>``) is root's, mode 0711: sshd, running as
the user, can reach the files it needs by name, which are the user's (0600; the script
0700; ``sshd.log`` is made empty for sshd to append to), but the user can add, rename or
remove nothing in it, so nothing of the user's stays behind once the agent removes it: at
the session's end, when the job ends (its sshd dies, the session ends), and at the agent's
next start (:meth:`JobShellSessions.recover`; the agent keeps no session across a
restart, so every directory it finds then is an orphan, as is every ``ssh-to-job`` leaf of
a job, whose processes it kills).

``session-setup`` cds to the job's working directory, loads the job's environment (read
from ``/proc/<main pid>/environ`` when the session opens, written as a quoted sh file),
exports ``CALLERID_JOB_ID`` and ``CALLERID_JOB_PIDS`` (main pid first) and runs
``$SSH_ORIGINAL_COMMAND`` with a shell, or a login shell (greeted as condor_ssh_to_job
greets when it has a terminal: :func:`session_setup_text`): the first of the client's
``shells`` that is an executable file in the job's view, as the user sees it, else
``/bin/sh`` (the agent only checks that each is an absolute plain path, and never looks at
them itself: a stat as root would tell the user about paths only root may see, and could
hang on a dead network mount). sftp: a ForceCommand overrides the ``Subsystem``; OpenSSH
then runs the forced command with ``SSH_ORIGINAL_COMMAND=internal-sftp`` (the subsystem's
configured command), which the script turns into ``exec sftp-server`` (so sftp, and scp,
which uses sftp since OpenSSH 9, also run in the job's directory and environment).

sshd runs the forced command with the user's passwd shell, and refuses users without a
passwd entry; for those, and for nologin/false shells, sshd gets nss_wrapper
(``LD_PRELOAD``) with a private passwd/group file naming a working shell.

**Jobs with their own mount namespace.** sshd reads its files after the launcher entered
the job's namespaces, so they must be visible there. When the job shares the agent's mount
namespace, or has its own but the session directory is the same directory at the same path
in it (:func:`session_dir_visible`: (st_dev, st_ino) of the directory and of
``/proc/<main pid>/root/<directory>``), the agent writes the files, as root, into the
directory it has just made in its own root-owned ``run_dir``. Otherwise (a private tmpfs
over ``/run``, as job containers make) the files must be made in the job's view, which the
job's user controls (symlinks, mounts in a user namespace), so the root agent neither
writes there nor opens any path of it (the stat above is all it does). It gives the
launcher the files' contents (launch.py's ``session``) instead: after setns and after
dropping to the job's user, the launcher makes ``<base>/<job>-<session id>`` (0700; the id
is random, an existing directory is never used) in the first of :func:`session_bases` that
takes it (the same ``run_dir`` path, the job's ``$TMPDIR``, ``/tmp``; only a base whose
entries nobody but root or the user can rename, and a path that needs no quoting), writes
the files, and execs sshd with the directory's paths rewritten. When the session ends
(:meth:`Session.cleanup`, also after ``adoptctl job end`` killed sshd) the launcher runs
once more, again as the user in the job's mount namespace, and removes that directory
(:class:`JobViewDir`). The agent holds that namespace open (an nsfs fd) from the start, so
the removal works even when every process of the job is gone, e.g. when the directory is in
a /tmp shared with the node. The session's ``sshd.log`` is in the directory sshd uses. (If
the agent dies first, that directory stays: it is the user's own, in the user's view, and
a restarted agent no longer knows the namespace; the agent's own directory, holding only
the host key, goes at its next start as every other.)

That clean-up helper touches what the job controls, so it is contained like everything the
agent runs for a job: it joins a cgroup before it enters the job's namespace, imports
nothing after (launch.py), and is bounded by a timeout past which its whole cgroup is
killed. While the job runs, that cgroup is the session's own leaf. Once the job has ended
(``adoptctl job end``, or its main process exited) its cgroups are gone, and the helper
gets a transient cgroup of the agent's outside every job (the backend's `helper_cgroup`;
the native registry's is ``<subtree>/ssh-to-job-cleanup/job_<session id>/remove``),
removed after it: a place that is still killed as a whole and that nothing mistakes for a
job, and not a new directory under the ended job's path, which would bring the job's
cgroups back.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from callerid import CgroupError, Job
from node_agent import jobenv, shellwire, spawn
from node_agent.agent.warmup import MigrationWarmer
from node_agent.errors import InvalidRequest, JobNotFound, JobNotRunning, JobStartFailed
from node_agent.jobenv import namespaces_to_enter
from node_agent.jobs.base import JobBackend, JobCgroup
from node_agent.relaybuf import FRAME, Pacer, read_gathered

log = logging.getLogger("node_agent.agent.sessions")
security = logging.getLogger("node_agent.security")

PIPE_SIZE = 1 << 20   # sshd's stdin/stdout pipes
NSS_WRAPPER = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SSHD_START_TIMEOUT = 20.0   # the launcher, from start to exec'ing sshd (spawn.start)
CLEANUP_TIMEOUT = 10.0      # a clean-up helper, from start to exit
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
NO_LOGIN_SHELLS = frozenset({"", "/usr/sbin/nologin", "/sbin/nologin", "/bin/false",
                             "/usr/bin/false", "/bin/nologin", "/usr/bin/nologin"})
# Set by sshd for the session; the job's values must not override them.
_SESSION_VARS = re.compile(r"^(SSH_.*|TERM|DISPLAY|XAUTHORITY|MAIL|SHLVL|PWD|OLDPWD|_)$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_public_key(line: str) -> str:
    """The key line, stripped, if it is one OpenSSH public key: ``TYPE BASE64 [comment]``
    with a known type whose base64 body names the same type; else InvalidRequest."""
    text = line.strip()
    if not text or "\n" in text or "\r" in text or "\0" in text:
        raise InvalidRequest("public key: expected one line")
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise InvalidRequest("public key: expected 'TYPE BASE64 [comment]' with a known type")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("public key: invalid base64 body") from None
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n != len(parts[0]) or blob[4:4 + n] != parts[0].encode():
        raise InvalidRequest("public key: body does not match its type")
    return text


def sh_quote(value: str) -> str:
    """Single-quote *value* for sh (any byte but NUL survives)."""
    return "'" + value.replace("'", "'\\''") + "'"


def env_file_text(env: dict[str, str]) -> str:
    """The job's environment as sh ``export`` lines; names sh cannot hold and the
    variables sshd sets for the session are left out."""
    lines = ["# the job's environment, written by node_agent.agent.sessions"]
    for name in sorted(env):
        if _VAR_NAME.match(name) and not _SESSION_VARS.match(name) and "\0" not in env[name]:
            lines.append(f"export {name}={sh_quote(env[name])}")
    return "\n".join(lines) + "\n"


def session_dir_visible(pid: int, path: Path, procfs: str = "/proc") -> bool:
    """Whether the agent's directory *path* is the same directory at the same path in the
    mount namespace of *pid*: same (st_dev, st_ino) through ``<procfs>/<pid>/root``. Only
    metadata is read through the job's view (absolute symlinks there resolve against the
    agent's root): a wrong answer can only make that user's own session fail."""
    try:
        a, b = os.stat(path), os.stat(f"{procfs}/{pid}/root{path}")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def session_bases(run_dir: Path, env: Mapping[str, str]) -> list[str]:
    """Where the launcher may make a session's directory in a job's own mount namespace,
    in order: the agent's ``run_dir`` path (if the job's view has it and lets the user
    write there), the job's ``$TMPDIR``, ``/tmp``."""
    out: list[str] = []
    for base in (str(run_dir), env.get("TMPDIR", ""), "/tmp"):
        base = os.path.normpath(base) if base.startswith("/") else ""
        if base and base not in out:
            out.append(base)
    return out


def devpts_gives_tty_group(pid: int | str = "self", procfs: str = "/proc") -> bool:
    """Whether new ptys on the process's /dev/pts get the ``tty`` group (mount option
    ``gid=5``). sshd (not root) chowns the pty to (user, tty) and dies if it cannot; when
    this is false the agent gives sshd an nss_wrapper group file without ``tty``, and sshd
    then wants (user, user's group), which the pty already has."""
    try:
        tty_gid = grp.getgrnam("tty").gr_gid
    except KeyError:
        return True      # no tty group: sshd uses the user's group
    found = False
    try:
        with open(f"{procfs}/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/dev/pts" and " - devpts " in line:
                    opts = line.split(" - ", 1)[1].split()[-1].split(",")
                    found = f"gid={tty_gid}" in opts
    except OSError:
        return True
    return found


def sshd_config_text(d: Path) -> str:
    """The configuration of a session's `sshd -i`, all of its files in `d`."""
    return "\n".join([
        "# a private sshd -i for one ssh-to-job session (node_agent.agent.sessions)",
        f"HostKey {d}/host_key",
        f"AuthorizedKeysFile {d}/authorized_keys",
        "AuthorizedKeysCommand none",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "PidFile none",
        "PermitTTY yes",
        "PermitUserEnvironment no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "LoginGraceTime 30",
        "X11Forwarding yes",
        "X11UseLocalhost yes",
        "AllowAgentForwarding no",
        # ssh -L / -D (VS Code Remote-SSH): sshd, the job's user in the job's network
        # namespace, connects where that user could from inside the job anyway. Nothing
        # listens for the client (no -R, no gateway ports), no Unix-socket forwarding.
        "AllowTcpForwarding local",
        "PermitListen none",
        "GatewayPorts no",
        "AllowStreamLocalForwarding no",
        "PermitTunnel no",
        "Subsystem sftp internal-sftp",
        f"ForceCommand {d}/session-setup",
        "",
    ])


def session_setup_text(d: Path, cwd: str, job_id: str, pids: Sequence[int],
                       shells: Sequence[str], nss_wrapper: bool, *, node: str) -> str:
    """The ForceCommand script. *shells* are shellwire.validate_shells' (plain absolute
    paths); the first that is an executable file in the job's view is the session's
    shell.

    An interactive login -- no command (``$SSH_ORIGINAL_COMMAND`` empty) and a terminal
    on both stdin and stdout -- is greeted as condor_ssh_to_job greets (its
    condor_ssh_to_job_shell_setup), naming *node* as the agent knows it::

        Welcome to node2!
        Your job 42 is running with pid(s) 4711 4712.

    Nothing else ever is: a command, scp, sftp (``internal-sftp``), rsync and ``ssh -T``
    have a command or no terminal, and their streams carry the far side's bytes only.
    The pids line is left out when the job has no process, as HTCondor leaves it out."""
    nss = ""
    if nss_wrapper:
        nss = (f"export LD_PRELOAD={sh_quote(NSS_WRAPPER)} "
               f"NSS_WRAPPER_PASSWD={sh_quote(str(d / 'passwd'))} "
               f"NSS_WRAPPER_GROUP={sh_quote(str(d / 'group'))}\n")
    pick = ""
    if shells:
        pick = (f"for sh in {' '.join(sh_quote(s) for s in shells)}; do\n"
                '    if [ -f "$sh" ] && [ -x "$sh" ]; then shell=$sh; break; fi\n'
                "done\n")
    return f"""#!/bin/sh
# ForceCommand of an ssh-to-job session (node_agent.agent.sessions)
cd {sh_quote(cwd)} 2>/dev/null || cd / || exit 1
. {sh_quote(str(d / 'environment'))}
{nss}export {jobenv.JOB_ID}={sh_quote(job_id)}
export {jobenv.JOB_PIDS}={sh_quote(' '.join(map(str, pids)))}
shell=/bin/sh
{pick}export SHELL="$shell"
case "${{SSH_ORIGINAL_COMMAND-}}" in
    internal-sftp|{SFTP_SERVER}) exec {SFTP_SERVER} ;;
esac
if [ -n "${{SSH_ORIGINAL_COMMAND-}}" ]; then
    exec "$shell" -c "$SSH_ORIGINAL_COMMAND"
fi
# a login on a terminal: greet it (commands, scp, sftp, rsync, ssh -T stay byte-clean)
if [ -t 0 ] && [ -t 1 ]; then
    printf 'Welcome to %s!\\n' {sh_quote(node)}
    if [ -n "${{{jobenv.JOB_PIDS}}}" ]; then
        printf 'Your job %s is running with pid(s) %s.\\n' \\
            "${{{jobenv.JOB_ID}}}" "${{{jobenv.JOB_PIDS}}}"
    fi
fi
exec "$shell" -l
"""


class Session:
    """One running ``sshd -i``; the caller relays bytes with write/read. Always call
    :meth:`cleanup` at the end (idempotent; kills sshd if alive, removes the directory)."""

    def __init__(self, session_id: str, directory: Path, proc: subprocess.Popen[bytes],
                 host_key: str, user: str, job_id: str, cgroup: JobCgroup,
                 job_view: JobViewDir | None = None) -> None:
        self.session_id = session_id
        self.cgroup = cgroup
        self.directory = directory
        self.job_view = job_view
        self.host_key = host_key
        self.user = user
        self.job_id = job_id
        self.proc = proc
        self.pid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._inbound = Pacer()  # bulk in -> sshd's small replies may linger (relaybuf)
        # kill() runs in gRPC's cancel callback and in cleanup(), possibly at once.
        self._lock = threading.Lock()
        self._killed = False

    def write(self, data: bytes | memoryview) -> None:
        """Send bytes to sshd's stdin; BrokenPipeError when sshd is gone."""
        self._inbound.saw(len(data))
        view = memoryview(data)
        fd = self._stdin.fileno()
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def close_stdin(self) -> None:
        """Half-close: sshd sees EOF on its input."""
        if not self._stdin.closed:
            self._stdin.close()

    def read(self, n: int = FRAME) -> list[bytes]:
        """Up to *n* bytes of sshd's output, in the pieces read (relaybuf); [] at EOF."""
        if self._stdout.closed:
            return []
        return read_gathered(self._stdout.fileno(), n, linger=self._inbound.linger())

    def __iter__(self) -> Iterator[list[bytes]]:
        while parts := self.read():
            yield parts

    def wait(self, timeout: float | None = None) -> int:
        """Wait for sshd to exit; its exit status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL sshd and everything the session started: all of it lives in the
        session's own cgroup (``ssh-to-job/<session id>``), including processes that
        left sshd's tree (setsid, double fork, nohup). The rest of the job is untouched.
        The leaf itself stays while a directory in the job's view is still to be removed:
        the clean-up helper runs in it (:meth:`cleanup`)."""
        with self._lock:
            if not self._killed:
                try:
                    self.cgroup.kill(timeout=10.0)
                except CgroupError as e:
                    log.warning("job %s: ssh session %s: %s", self.job_id, self.session_id, e)
                if self.proc.poll() is None:  # not in the cgroup after all (a failed start)
                    self.proc.kill()
                self.proc.wait()
                self._killed = True
            if self.job_view is None or self.job_view.removed:
                self._remove_leaf()

    def _remove_leaf(self) -> None:
        try:
            self.cgroup.remove()
        except CgroupError as e:
            log.debug("job %s: ssh session %s: %s", self.job_id, self.session_id, e)

    def cleanup(self) -> None:
        """Kill what the session runs, remove its files and cgroup (idempotent)."""
        try:
            self.kill()
        finally:
            for f in (self._stdin, self._stdout):
                try:
                    f.close()
                except OSError:
                    pass
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.job_view is not None:
                self.job_view.remove()
                with self._lock:
                    self._remove_leaf()


class _HelperCgroup:
    """Where a clean-up helper runs: a cgroup that it joins before it touches anything,
    and that is killed as a whole. Either the session's own leaf in the job (`transient`
    false: left to its owner) or one outside every job, made for the helper and removed
    after it (`transient`)."""

    def __init__(self, cgroup: JobCgroup, transient: bool) -> None:
        self.cgroup, self.transient = cgroup, transient

    def __str__(self) -> str:
        return str(self.cgroup)

    def enter(self) -> list[str]:
        """The ``cgroup.procs`` files to join; CgroupError when the cgroup is not there
        (the session's leaf) or cannot be made (a transient one)."""
        return self.cgroup.create() if self.transient else self.cgroup.join()

    def kill(self) -> None:
        try:
            self.cgroup.kill(timeout=5.0)
        except CgroupError as e:
            log.warning("cannot kill the clean-up helper's cgroup %s: %s", self, e)

    def release(self) -> None:
        if not self.transient:
            return
        self.kill()   # nothing should be left; if anything is, it does not outlive this
        try:
            self.cgroup.remove()
        except CgroupError as e:
            log.warning("cannot remove the clean-up helper's cgroup %s: %s", self, e)


class JobViewDir:
    """A session's directory in a job's own mount namespace, made and removed by the
    launcher as the job's user there (see the module's docstring). The job's mount
    namespace is held open until :meth:`remove`.

    *job_running* tells whether the job still runs (its cgroups are there and are not
    being removed): then the clean-up helper runs in the session's leaf, else in a
    transient cgroup outside the job (`JobBackend.helper_cgroup`)."""

    def __init__(self, agent_dir: Path, bases: list[str], mnt_ns: str, uid: int, gid: int,
                 groups: list[int], *, jobs: JobBackend, job_id: str, session_id: str,
                 job_running: Callable[[], bool]) -> None:
        self.session: dict[str, object] = {"dir": str(agent_dir), "bases": bases}
        self._ids = {"uid": uid, "gid": gid, "groups": groups}
        self._jobs, self._job_id, self._sid = jobs, job_id, session_id
        self._job_running = job_running
        self.removed = False
        self._fd = os.open(mnt_ns, os.O_RDONLY | os.O_CLOEXEC)

    def spec(self, files: Mapping[str, str]) -> dict[str, object]:
        """launch.py's ``session`` for these files (names and contents)."""
        return {**self.session, "files": [[name, 0o700 if name == "session-setup" else 0o600,
                                           text] for name, text in files.items()]}

    def remove(self, timeout: float = CLEANUP_TIMEOUT) -> None:
        """Remove the directory in the job's view (idempotent; never raises)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        spec = {"namespaces": [f"/proc/self/fd/{fd}"], **self._ids, "remove": True,
                "session": self.session}
        try:
            done = False
            if self._job_running():
                done = self._run(spec, fd, _HelperCgroup(
                    self._jobs.session_cgroup(self._job_id, self._sid), transient=False),
                    timeout)
            if not done:
                # The job ended before or while the helper ran (it was killed with it).
                self._run(spec, fd, _HelperCgroup(
                    self._jobs.helper_cgroup(self._sid), transient=True), timeout)
        finally:
            os.close(fd)
            self.removed = True

    def _run(self, spec: dict[str, object], fd: int, where: _HelperCgroup,
             timeout: float) -> bool:
        """Run the removal helper in *where*; False when it could not start there or was
        killed from outside (the job's end), so that another place may be tried."""
        what = f"session directory {self.session['dir']} in a job's mount namespace"
        try:
            procs = where.enter()
        except CgroupError as e:
            log.debug("%s: no clean-up helper in %s: %s", what, where, e)
            return False
        try:
            try:
                proc = spawn.start({**spec, "cgroup_procs": procs}, pass_fds=(fd,),
                                   timeout=timeout, enroll=where.cgroup.enroll)
            except (OSError, ValueError, spawn.LaunchError) as e:
                log.info("%s: cannot start the clean-up helper in %s: %s", what, where, e)
                return False
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                where.kill()                  # the helper and anything it may have started
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                log.warning("%s: removal took over %gs: its cgroup %s was killed", what,
                            timeout, where)
                return True
            if rc < 0:
                log.info("%s: the clean-up helper in %s was killed (signal %d)", what, where,
                         -rc)
                return False
            if rc != 0:
                log.warning("%s: the clean-up helper could not enter the job's mount "
                            "namespace as the user (exit status %d)", what, rc)
            else:
                log.debug("%s: removed by a clean-up helper in %s", what, where)
            return True
        finally:
            where.release()


class HostKeys:
    """Session host keys made ahead of need. Running ssh-keygen costs a session's set-up
    some 8 ms of its critical path; a thread keeps `stock` fresh pairs instead, made at
    the lowest CPU priority a moment after the last one was taken (so that making the next
    key does not compete with the session being set up). A pair is in memory only (it
    exists on disk while ssh-keygen writes it, in a root-only temporary directory) and is
    handed out once: every session still has a host key of its own. With none in stock
    the caller makes its own, as before."""

    def __init__(self, make: Callable[[Path], None], stock: int = 2,
                 pause: float = 1.0) -> None:
        self._make = make
        self._stock_size = stock
        self._pause = pause
        self._stock: list[tuple[str, str]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def take(self) -> tuple[str, str] | None:
        """A (private, public) key pair in OpenSSH format, or None when none is ready."""
        with self._cond:
            pair = self._stock.pop() if self._stock else None
            if self._thread is None:   # started by the first session: idle agents make none
                self._thread = threading.Thread(target=self._fill, name="host-keys",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return pair

    def _fill(self) -> None:
        while True:
            with self._cond:
                while len(self._stock) >= self._stock_size:
                    self._cond.wait()
            time.sleep(self._pause)
            try:
                with tempfile.TemporaryDirectory(prefix="ssh-to-job-keys.") as tmp:  # 0700
                    self._make(Path(tmp))
                    pair = ((Path(tmp) / "host_key").read_text(),
                            (Path(tmp) / "host_key.pub").read_text())
            except (OSError, JobStartFailed) as e:
                log.warning("cannot make a session host key ahead of need: %s", e)
                time.sleep(30)
                continue
            with self._cond:
                self._stock.append(pair)


class JobShellSessions:
    """Opens ssh-to-job sessions for the jobs of one backend."""

    def __init__(self, jobs: JobBackend, run_dir: str | os.PathLike[str], node: str, *,
                 sshd: str = "/usr/sbin/sshd", ssh_keygen: str = "/usr/bin/ssh-keygen",
                 nss_wrapper: str = NSS_WRAPPER, procfs: str = "/proc",
                 warmer: MigrationWarmer | None = None) -> None:
        self.jobs = jobs
        self.warmer = warmer
        self.run_dir = Path(run_dir)
        self.node = node
        self.sshd = sshd
        self.ssh_keygen = ssh_keygen
        self.nss_wrapper = nss_wrapper
        self.procfs = procfs
        self.host_keys = HostKeys(lambda d: self._keygen(d, nice=True))

    def recover(self) -> None:
        """At the agent's start, before it serves: remove what sessions of an earlier run
        left. A session does not outlive the agent that relays it, so everything found now
        is an orphan (a crash, ``kill -9``): every directory under ``run_dir``, every
        ``ssh-to-job`` leaf of a live job (what still runs there is killed) and every
        transient clean-up cgroup. Never raises: what cannot be removed is logged."""
        self._make_run_dir()
        dirs = 0
        for entry in sorted(os.scandir(self.run_dir), key=lambda e: e.name):
            try:
                if entry.is_dir(follow_symlinks=False):
                    # An older agent made these directories the user's: rmtree does not
                    # follow symlinks (fd-based on Linux) whatever the user put there.
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                dirs += 1
            except OSError as e:
                log.warning("cannot remove %s, left by an earlier run: %s", entry.path, e)
        leaves = killed = 0
        for rec in self.jobs.list_jobs():
            job_id = rec.job.id
            sessions = self.jobs.session_cgroup(job_id)
            try:
                if not sessions.exists():
                    continue
                killed += sessions.kill(timeout=10.0)
                sessions.remove()
                leaves += 1
            except CgroupError as e:
                # Race: the job may end meanwhile (the backend's watcher already runs).
                log.warning("job %s: cannot remove the ssh-to-job sessions left by an "
                            "earlier run: %s", job_id, e)
        for helper in self.jobs.leftover_helper_cgroups():
            try:
                killed += helper.kill(timeout=10.0)
                helper.remove()
            except CgroupError as e:
                log.warning("cannot remove a clean-up helper's cgroup left by an earlier "
                            "run (%s): %s", helper, e)
        if dirs or leaves or killed:
            log.info("ssh-to-job: removed what sessions of an earlier run left: %d session "
                     "directories, the sessions of %d jobs, %d processes killed",
                     dirs, leaves, killed)

    def _make_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.run_dir, 0o711)   # whatever the umask: users reach their session only

    def open(self, job_id: str, caller_uid: int, admin: bool, public_key: str,
             shells: list[str]) -> Session:
        """A session in the job for the caller. Someone else's job is answered exactly
        like a job that does not exist (JobNotFound, "no job X on NODE"): nobody learns
        which jobs others run here, or whose they are; the refusal is logged."""
        rec = self.jobs.get(job_id)
        if rec is not None and not (admin or caller_uid == 0 or caller_uid == rec.job.uid):
            security.warning("SECURITY: uid %d asked %s for a shell in job %s of uid %d: "
                             "refused, answered as for a missing job", caller_uid, self.node,
                             job_id, rec.job.uid)
            rec = None
        if rec is None:
            raise JobNotFound(job_id, self.node)
        if rec.state != "running":   # an ending job's processes are being killed
            raise JobNotRunning(job_id, self.node, rec.state)
        job = rec.job
        key = validate_public_key(public_key)
        shells = shellwire.validate_shells(shells)
        if self.warmer is not None:
            # sshd's launcher joins the session's cgroup some tens of ms from now: keep
            # the kernel's migration lock switched until then (node_agent/agent/warmup.py).
            self.warmer.expect_login()
        try:
            return self._open(job, caller_uid, key, shells)
        finally:
            if self.warmer is not None:
                self.warmer.login_arrived()

    def _job_running(self, job_id: str) -> bool:
        """Whether the job's cgroups are there to stay a moment: a job whose end has
        begun is recorded as "ending" before anything is killed. (Race: an end that
        begins after this answer kills a helper that already joined the session's leaf,
        and JobViewDir then retries elsewhere; one that kills before the helper joins and
        removes the leaf after it finds the leaf busy, a window of the kill loop's last
        pass, and fails as an ending that found a process fails.)"""
        rec = self.jobs.get(job_id)
        return rec is not None and rec.state == "running"

    def _open(self, job: Job, caller_uid: int, key: str, shells: list[str]) -> Session:
        """The session, once the caller may have it and its key and shells are valid."""
        job_id = job.id
        pids = self.job_pids(job_id)
        main = self.jobs.main_pid(job_id)
        env: dict[str, str] = {}
        cwd = ""
        namespaces: list[str] = []
        if main is not None:
            try:
                env = self.jobs.environment(job_id)
                cwd = os.readlink(f"{self.procfs}/{main}/cwd")
            except OSError as e:
                log.warning("job %s: cannot read environment/cwd of pid %d: %s", job_id, main, e)
            namespaces = namespaces_to_enter(main, self.procfs)
        try:
            pw: pwd.struct_passwd | None = pwd.getpwuid(job.uid)
        except KeyError:
            pw = None
        home = pw.pw_dir if pw else (cwd or "/")
        cwd = cwd or home
        no_tty_group = not devpts_gives_tty_group(main or "self", self.procfs)
        fake_passwd = pw is None or pw.pw_shell in NO_LOGIN_SHELLS or \
            not os.access(pw.pw_shell, os.X_OK) or no_tty_group
        if fake_passwd and not os.path.exists(self.nss_wrapper):
            raise JobStartFailed(f"user {job.user} has no usable login shell and "
                                 f"{self.nss_wrapper} is missing")
        user = pw.pw_name if pw else job.user

        self._make_run_dir()
        sid = secrets.token_hex(8)
        d = self.run_dir / f"{job_id}-{sid}"
        d.mkdir(mode=0o700)
        proc = None
        job_view: JobViewDir | None = None
        try:
            self._host_key(d)
            host_key = (d / "host_key.pub").read_text().split(" ")[:2]
            files = {
                "authorized_keys": key + "\n",
                "sshd_config": sshd_config_text(d),
                "environment": env_file_text(env),
                "session-setup": session_setup_text(d, cwd, job_id, pids, shells, fake_passwd,
                                                    node=self.node),
            }
            if fake_passwd:
                # sshd runs the ForceCommand with this shell: /bin/sh, not one of the
                # client's, which only session-setup looks at (as the user).
                files["passwd"], files["group"] = _fake_nss(
                    user, job.uid, job.gid, home,
                    pw.pw_shell if pw and pw.pw_shell not in NO_LOGIN_SHELLS else "/bin/sh",
                    drop_tty=no_tty_group)
            groups = os.getgrouplist(pw.pw_name, job.gid) if pw else [job.gid]
            sshd_env = {"PATH": spawn.LOGIN_PATH}
            if fake_passwd:
                sshd_env.update(LD_PRELOAD=self.nss_wrapper, NSS_WRAPPER_PASSWD=str(d / "passwd"),
                                NSS_WRAPPER_GROUP=str(d / "group"))
            cgroup = self.jobs.session_cgroup(job_id, sid)
            procs = cgroup.create()
            spec = {
                "cgroup_procs": procs,
                # no cgroup of its own (Slurm's extern step): the launcher keeps the tree
                "reaper": not procs,
                "namespaces": namespaces,
                "uid": job.uid, "gid": job.gid, "groups": groups,
                # sshd cds to the home directory and session-setup to the job's; "/" exists
                # in every view and needs no look at a path of the job's as root
                "cwd": "/",
                "argv": [self.sshd, "-i", "-f", str(d / "sshd_config"), "-e"],
                "env": sshd_env, "output": str(d / "sshd.log"), "stdio": "inherit",
            }
            mnt = f"{self.procfs}/{main}/ns/mnt"
            if main is not None and mnt in namespaces and \
                    not session_dir_visible(main, d, self.procfs):
                # the launcher writes them, as the user, in the job's view (module docstring)
                job_view = JobViewDir(d, session_bases(self.run_dir, env), mnt, job.uid,
                                      job.gid, groups, jobs=self.jobs,
                                      job_id=job_id, session_id=sid,
                                      job_running=lambda: self._job_running(job_id))
                files["host_key"] = (d / "host_key").read_text()
                spec["session"] = job_view.spec(files)
            else:
                files["sshd.log"] = ""   # the user cannot create it in a directory of root's
                _write_session_files(d, files, job.uid, job.gid)
            proc = self._launch(spec, job_id, cgroup)
            session = Session(sid, d, proc, " ".join(host_key), user, job_id, cgroup,
                              job_view)
        except BaseException:
            self._undo_open(job_id, sid, d, proc, job_view)
            raise
        log.info("job %s: ssh session %s opened for uid %d: sshd pid %d as %s%s%s", job_id,
                 sid, caller_uid, proc.pid, user, " (nss_wrapper)" if fake_passwd else "",
                 " (files in the job's own mount namespace)" if job_view else "")
        return session

    def _undo_open(self, job_id: str, sid: str, d: Path, proc: subprocess.Popen[bytes] | None,
                   job_view: JobViewDir | None) -> None:
        """A session that failed to open: what it started is killed, what it made removed."""
        cgroup = self.jobs.session_cgroup(job_id, sid)
        try:
            cgroup.kill(timeout=10.0)
        except CgroupError as e:
            log.warning("job %s: ssh session %s: %s", job_id, sid, e)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)
        if job_view is not None:
            job_view.remove()
        try:
            cgroup.remove()
        except CgroupError:
            pass

    def job_pids(self, job_id: str) -> list[int]:
        """The job's pids, main first, without the processes of ssh-to-job sessions."""
        sessions = self.jobs.session_cgroup(job_id).procs()
        return [p for p in self.jobs.pids(job_id) if p not in sessions]

    def _host_key(self, d: Path) -> None:
        """d/host_key and d/host_key.pub: a fresh pair, made ahead of need if one is
        ready (HostKeys), else now."""
        pair = self.host_keys.take()
        if pair is None:
            self._keygen(d)
            return
        for name, text, mode in (("host_key", pair[0], 0o600), ("host_key.pub", pair[1], 0o644)):
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def _keygen(self, d: Path, nice: bool = False) -> None:
        argv = [self.ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C",
                f"ssh-to-job@{self.node}", "-f", str(d / "host_key")]
        r = subprocess.run(["nice", "-n", "19", *argv] if nice else argv,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if r.returncode != 0:
            raise JobStartFailed(f"ssh-keygen failed: {r.stderr.decode(errors='replace')}")

    def _launch(self, spec: dict[str, object], job_id: str,
                cgroup: JobCgroup) -> subprocess.Popen[bytes]:
        try:
            proc = spawn.start(spec, pipes=True, timeout=SSHD_START_TIMEOUT,
                               enroll=cgroup.enroll)
        except spawn.LaunchError as e:
            raise JobStartFailed(f"job {job_id}: cannot start sshd: {e}") from None
        except (OSError, ValueError) as e:   # the scheduler did not take it (enroll)
            raise JobStartFailed(f"job {job_id}: cannot put sshd into the job: {e}") from None
        # Bigger pipes, bigger reads: a bulk copy moves in fewer gRPC frames (each costs
        # ~0.1 ms of CPU in Python's gRPC, whatever its size).
        for f in (proc.stdin, proc.stdout):
            try:
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[union-attr]
            except OSError:
                pass
        return proc


def _write_session_files(d: Path, files: Mapping[str, str], uid: int, gid: int) -> None:
    """Write the session's files into *d* (just made, root's) as the user's, 0600 (the
    script 0700), and open *d* to be traversed (0711): sshd runs as the user and reaches
    them by name, but the user can add, rename or remove nothing in *d*. The keys
    ssh-keygen made there become the user's too."""
    for name, text in files.items():
        mode = 0o700 if name == "session-setup" else 0o600
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                     os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)   # whatever the umask
            os.write(fd, text.encode())
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    for name in ("host_key", "host_key.pub"):
        os.chown(d / name, uid, gid)
    os.chmod(d, 0o711)


def _fake_nss(user: str, uid: int, gid: int, home: str, shell: str, *,
              drop_tty: bool = False) -> tuple[str, str]:
    """passwd and group files for nss_wrapper: the system's entries (sshd looks up its
    privilege separation user too) with the job user's replaced by one with *shell*; and
    without the ``tty`` group when *drop_tty* (see devpts_gives_tty_group)."""
    lines = [f"{user}:x:{uid}:{gid}:ssh-to-job user:{home}:{shell}"]
    lines += [":".join([p.pw_name, "x", str(p.pw_uid), str(p.pw_gid), p.pw_gecos, p.pw_dir,
                        p.pw_shell]) for p in pwd.getpwall()
              if p.pw_uid != uid and p.pw_name != user]
    groups = [":".join([g.gr_name, "x", str(g.gr_gid), ",".join(g.gr_mem)])
              for g in grp.getgrall() if not (drop_tty and g.gr_name == "tty")]
    if not any(g.gr_gid == gid for g in grp.getgrall()):
        groups.append(f"{user}:x:{gid}:")
    return "\n".join(lines) + "\n", "\n".join(groups) + "\n"
