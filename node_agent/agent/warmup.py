"""Pre-pay the kernel's toll for moving a process between cgroups.

Writing a pid to `cgroup.procs` takes the kernel's global cgroup_threadgroup_rwsem for
writing (kernel/cgroup/cgroup.c, cgroup_attach_lock). After a quiet spell that lock is
in its fast-reader mode, and the first writer waits for an RCU grace period to switch
it (rcu_sync_enter): measured 5-15 ms on the test machines, every adoption after a
pause. Later writers within about a grace period find it already switched and take
microseconds.

The agent starts that switch ahead of the adoption, by moving a helper process of its
own between two cgroups of its own (`kick`); the real adoption then follows on a warm
lock. The helper is a `sleep` in `<subtree>/.warmup/{a,b}` of the first configured
hierarchy. Nothing outside the agent's subtree is touched. It kicks:

* when a login's PAM transaction starts (`LoginWatch`): libpam opens
  `/etc/pam.d/<service>` at pam_start, which sshd calls at the first user-auth request,
  well before the account phase (pam_python alone then spends ~15 ms starting Python);
* when the PAM module connects to the admission socket, and when a login needs a
  caller-ID call to the source node. (Mounting cgroup2 with `favordynmods`
keeps the lock switched for good, at some cost to every fork; that is the site's call,
not the agent's.)
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("node_agent.agent.warmup")

DIR = ".warmup"


class MigrationWarmer:
    """Moves a helper process of the agent's between two cgroups of the agent's, made in
    `scratch` (a cgroup directory of the agent's own: the job backend's `scratch_cgroups`;
    None turns the warmer off).

    `kick` moves it once, in the background. `expect_login` keeps moving it every
    `interval` seconds (shorter than a grace period, so the lock never switches back)
    while a login it announced is pending: until its admission request has come
    (`login_arrived`), or `hold` seconds after it was announced.

    That keeping is for logins that come one at a time. When `burst` or more logins are
    pending at once, it stops, and starts again only after `hold` seconds without such a
    crowd: in a burst the adoptions themselves take the lock often, and 500 more takings
    a second would each wait for the burst's forks to leave the lock, which wait for the
    writers in turn. (200 concurrent logins on 2 cores: answers took up to 0.5-1.7 s in
    6 of 12 bursts with the keeping, in 1 of 10 without.)
    """

    def __init__(self, scratch: str | os.PathLike[str] | None, *, interval: float = 0.002,
                 hold: float = 1.0, burst: int = 4) -> None:
        self.interval = interval
        self.hold = hold
        self.burst = burst
        self._lock = threading.Lock()
        self._busy = False
        self._expected: collections.deque[float] = collections.deque()  # when each expires
        self._crowd_until = 0.0  # no keeping before this (a burst was seen)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dirs: list[Path] = []
        self._turn = 0
        if scratch is None:
            return
        top = Path(scratch) / DIR
        try:
            self._clear(top)
            self._dirs = [top / "a", top / "b"]
            for d in self._dirs:
                d.mkdir(parents=True, exist_ok=True)
            self._proc = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
            (self._dirs[0] / "cgroup.procs").write_text(str(self._proc.pid))
        except OSError as e:
            log.warning("migration warm-up disabled: %s", e)
            self.close()

    @staticmethod
    def _clear(top: Path) -> None:
        """Remove what a previous agent (killed before it could clean up) left."""
        for d in (top / "a", top / "b"):
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @property
    def enabled(self) -> bool:
        """Whether the warmer runs (its helper and cgroups could be made)."""
        return self._proc is not None

    def kick(self) -> None:
        """Start switching the lock now, in the background; never blocks the caller."""
        self._start(self._move_once)

    def expect_login(self) -> None:
        """A login is starting: keep the lock switched until its request comes."""
        with self._lock:
            now = time.monotonic()
            self._drop_expired(now)
            if len(self._expected) + 1 >= self.burst:
                self._crowd_until = now + self.hold
            self._expected.append(now + self.hold)
            if now < self._crowd_until:
                return
        self._start(self._keep)

    def login_arrived(self) -> None:
        """An admission request came in (the one `expect_login` announced, or another)."""
        with self._lock:
            if self._expected:
                self._expected.popleft()

    def _drop_expired(self, now: float) -> None:
        while self._expected and self._expected[0] <= now:
            self._expected.popleft()  # announced, never came (failed auth, a stray open)

    @property
    def keeping_paused(self) -> bool:
        """True while a burst of logins has turned the keeping off."""
        with self._lock:
            return time.monotonic() < self._crowd_until

    def _start(self, target: Callable[[], None]) -> None:
        if self._proc is None:
            return
        with self._lock:
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=target, name="cgroup-warmup", daemon=True).start()

    def _move(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._turn ^= 1
        try:
            (self._dirs[self._turn] / "cgroup.procs").write_text(str(proc.pid))
        except OSError as e:
            log.debug("warm-up move failed: %s", e)

    def _move_once(self) -> None:
        try:
            self._move()
        finally:
            with self._lock:
                self._busy = False

    def _keep(self) -> None:
        try:
            while True:
                self._move()
                with self._lock:
                    now = time.monotonic()
                    self._drop_expired(now)
                    if not self._expected or now < self._crowd_until:
                        return
                time.sleep(self.interval)
        finally:
            with self._lock:
                self._busy = False

    def close(self) -> None:
        """Stop moving, kill the helper, remove the warmer's cgroups."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        for d in self._dirs:
            try:
                d.rmdir()
            except OSError:
                pass
        if self._dirs:
            try:
                self._dirs[0].parent.rmdir()
            except OSError:
                pass


IN_OPEN = 0x00000020
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name


def parse_events(buf: bytes) -> list[str]:
    """The names of the files in a buffer of inotify events that were opened."""
    names = []
    off = 0
    while off + _EVENT.size <= len(buf):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
        name = buf[off + _EVENT.size: off + _EVENT.size + length].split(b"\0", 1)[0]
        off += _EVENT.size + length
        if mask & IN_OPEN and name:
            names.append(os.fsdecode(name))
    return names


class LoginWatch:
    """Call `on_login` whenever a PAM service's file in `pam_dir` is opened.

    Watches the directory (not the files), so an edited or replaced file keeps being
    watched. Any process opening the file counts; a spurious kick costs one move of
    the helper. Runs one thread; `close` stops it.
    """

    def __init__(self, on_login: Callable[[], None], services: Iterable[str],
                 pam_dir: str = "/etc/pam.d") -> None:
        self._names = frozenset(services)
        self._on_login = on_login
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        if not self._names:
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.warning("login watch disabled: inotify_init1: %s",
                        os.strerror(ctypes.get_errno()))
            return
        if libc.inotify_add_watch(fd, os.fsencode(pam_dir), IN_OPEN) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            log.warning("login watch disabled: cannot watch %s: %s", pam_dir,
                        os.strerror(err) if err != errno.ENOENT else "no such directory")
            return
        self._fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="login-watch", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        """Whether the watch runs (inotify could watch the PAM files)."""
        return self._thread is not None

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError as e:
                log.warning("login watch stopped: %s", e)
                return
            opened = [n for n in parse_events(buf) if n in self._names]
            if opened:
                log.debug("login starting (%s opened): warming up", opened[0])
                self._on_login()

    def close(self) -> None:
        """Stop watching."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1
