"""syslog for the lab: there is no syslog daemon on these machines, so the lab binds
/dev/log and runs a small listener (``lab.py _syslogd FD``) that writes what PAM modules
and daemons in the nodes log to ``<dir>/logs/syslog.log`` of the sending node's lab, as
``<time> <node> <facility>.<level> <message>``.

/dev/log is machine-wide: one instance owns the listener at a time, hands it to another
instance when it goes down while others are up, and the last one down stops it. A
/dev/log that is not the lab's is left alone. See README.md, "syslog".
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cgroups import pid_in_lab
from .daemons import DOWN_TIMEOUT, ProcessesMixin
from .host import ENTRY_POINT, SH, SYSTEM_PYTHON, ns_key, pid_alive, read_pid, write_file
from .instances import HEAD, live_instances, load_shared, save_shared

log = logging.getLogger("lab")

DEV_LOG = Path("/dev/log")
FACILITIES = {0: "kern", 1: "user", 2: "mail", 3: "daemon", 4: "auth", 5: "syslog", 6: "lpr",
              7: "news", 8: "uucp", 9: "cron", 10: "authpriv", 11: "ftp"}
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_BSD_TIME = re.compile(r"[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d ")
#: A sender gone by the time its message is read keeps the node it logged from before
#: for this long (pids wrap at 32768 here: far longer than this).
RECENT_PIDS = 60.0
#: How often the listener looks again for the nodes of the labs that are up, at least.
RESCAN_EVERY = 5.0
#: How many datagrams /dev/log queues for the listener. The kernel's default
#: (net.unix.max_dgram_qlen) is 10, which a burst of logins overflows at once: senders then
#: block, and pam_adopt gives up on a line after 0.2 s. systemd raises it to 512 on real
#: nodes (sysctl.d/50-default.conf), which the lab copies without touching the host's value.
DEVLOG_QUEUE = 512
CLONE_NEWNET = 0x40000000


def _devlog_socket() -> socket.socket:
    """The /dev/log datagram socket, queueing DEVLOG_QUEUE datagrams.

    A unix socket takes its queue length from net.unix.max_dgram_qlen of the network
    namespace it is created in. So it is made by a thread that unshares a network
    namespace of its own and raises the value there; the socket keeps that namespace
    alive, and /dev/log is reached by path, from any namespace. If that fails, the
    socket is made here, with the host's queue length, and a warning.
    """
    made: list[socket.socket] = []
    problem: list[str] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            Path("/proc/sys/net/unix/max_dgram_qlen").write_text(f"{DEVLOG_QUEUE}\n")
            made.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        except OSError as e:  # the thread ends here: its namespace goes with it
            problem.append(str(e))

    worker = threading.Thread(target=make, name="devlog-netns")
    worker.start()
    worker.join()
    if made:
        return made[0]
    log.warning("/dev/log keeps the host's queue length (a burst of logins may lose "
                "syslog lines): %s", problem[0] if problem else "?")
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


def format_syslog(data: bytes, node: str, now: float | None = None) -> str:
    """One line of syslog.log: ``<time> <node> <facility>.<level> <msg>``.

    ``b"<86>Nov 22 00:01:02 pam_adopt[42]: alice: hi"`` from node2 -> priority 86 =
    facility 10 (86 >> 3, authpriv), severity 6 (86 & 7, info); the BSD time stamp is
    replaced by the listener's own: ``... node2 authpriv.info pam_adopt[42]: alice: hi``.
    """
    text = data.decode(errors="replace").rstrip("\n\0")
    m = re.match(r"<(\d{1,3})>", text)
    where = "user.notice"
    if m:
        pri = int(m.group(1))
        where = f"{FACILITIES.get(pri >> 3, f'local{(pri >> 3) - 16}')}.{SEVERITIES[pri & 7]}"
        text = text[m.end():]
        t = _BSD_TIME.match(text)
        if t:
            text = text[t.end():]
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    text = text.replace("\n", "\\n")
    return f"{stamp} {node} {where} {text}\n"


class Listener:
    """The /dev/log listener: finds the lab node of each sender by its UTS namespace and
    appends the message to that lab's syslog.log (to every lab's, for ``host`` and ``?``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.host = ns_key("/proc/self/ns/uts")
        self.nodes: dict[tuple[int, int], tuple[str, Path]] = {}  # UTS ns -> node, lab dir
        self.recent: dict[int, tuple[tuple[int, int], float]] = {}  # pid -> UTS ns, when
        self.dirs: list[Path] = []
        self.scanned = 0.0

    def rescan(self) -> None:
        """The nodes of every lab that is up, by the key of their UTS namespace."""
        self.nodes.clear()
        self.dirs.clear()
        for _, d in sorted(live_instances().items()):
            self.dirs.append(d)
            with contextlib.suppress(OSError):
                for nd in (d / "ns").iterdir():
                    key = ns_key(nd / "uts")
                    if key is not None:
                        self.nodes[key] = (nd.name, d)
        self.scanned = time.monotonic()

    @staticmethod
    def sender_pid(anc: list[tuple[int, int, bytes]]) -> int | None:
        creds = struct.calcsize("3i")
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int(struct.unpack("3i", payload[:creds])[0])
        return pid

    def sender_ns(self, pid: int | None) -> tuple[int, int] | None:
        """The UTS namespace of the sender, or of its last message if it is gone."""
        key = ns_key(f"/proc/{pid}/ns/uts") if pid else None
        now = time.monotonic()
        if key is not None and key != self.host and key not in self.nodes:
            self.rescan()
        elif now - self.scanned > RESCAN_EVERY:
            self.rescan()
        if key is None and pid in self.recent and now - self.recent[pid][1] < RECENT_PIDS:
            key = self.recent[pid][0]  # gone since its last message (e.g. "session closed")
        if key is not None:
            self.recent[pid or 0] = (key, now)
            if len(self.recent) > 4096:
                for p in [p for p, (_, t) in self.recent.items() if now - t > RECENT_PIDS]:
                    del self.recent[p]
        return key

    def handle(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
        key = self.sender_ns(self.sender_pid(anc))
        if key is None:
            node, targets = "?", list(self.dirs)
        elif key in self.nodes:
            node, d = self.nodes[key]
            targets = [d]
        else:
            node, targets = "host", list(self.dirs)
        line = format_syslog(data, node)
        for d in targets:
            with contextlib.suppress(OSError), open(d / "logs" / "syslog.log", "a") as f:
                f.write(line)

    def serve(self) -> None:
        creds = struct.calcsize("3i")
        while True:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds))
            try:
                self.handle(data, anc)
            except Exception as e:  # a listener that dies loses everything after: keep going
                print(f"syslogd: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def syslogd(fd: int) -> int:
    """The /dev/log listener (``lab.py _syslogd FD``): FD is the bound datagram socket."""
    sock = socket.socket(fileno=fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Listener(sock).serve()
    return 0


class SyslogMixin(ProcessesMixin):
    """Who listens on /dev/log, and what the lab's nodes logged there."""

    def _ensure_logger(self) -> str:
        """Under the machine lock: make sure someone listens on /dev/log.

        Returns "lab" (the lab's listener: ours or another instance's) or "external".
        """
        shared = load_shared()
        dl = shared.get("devlog")
        try:
            st: os.stat_result | None = os.lstat(DEV_LOG)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not dl or dl.get("ino") != st.st_ino or not stat.S_ISSOCK(st.st_mode):
                return "external"
            if self._logger_pid(dl) is not None:
                return "lab"
            log.warning("%s is a stale socket of the lab's syslog listener: replacing it",
                        DEV_LOG)
            DEV_LOG.unlink()
        self._start_logger(shared)
        return "lab"

    def _start_logger(self, shared: dict[str, Any]) -> None:
        """Bind /dev/log, record it in the shared file and start the listener on it.

        The listener runs ``lab.py`` with -E -s (no PYTHON* variables, no user site), not
        -I: -I also leaves the script's directory off sys.path, where the package is."""
        sock = _devlog_socket()
        try:
            sock.bind(str(DEV_LOG))
            os.chmod(DEV_LOG, 0o666)
            shared["devlog"] = {"ino": os.lstat(DEV_LOG).st_ino, "name": self.name,
                                "dir": str(self.dir)}
            save_shared(shared)
            fd = sock.fileno()
            argv = [SH, "-c", f'{self._move_self(HEAD)} && exec "$@"', "lab-syslog",
                    SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable,
                    "-E", "-s", str(ENTRY_POINT), "_syslogd", str(fd)]
            self._spawn(argv, self.dir / "logs" / "syslogd.out",
                        self.dir / "pids" / "syslog.pid", pass_fds=[fd])
        finally:
            sock.close()

    @staticmethod
    def _logger_pid(dl: Mapping[str, Any]) -> int | None:
        pid = read_pid(Path(dl.get("dir", "/nonexistent")) / "pids" / "syslog.pid")
        if pid is None or not pid_alive(pid) or not pid_in_lab(pid, str(dl.get("name"))):
            return None
        return pid

    def _release_logger(self) -> None:
        """Under the machine lock, before this lab's cgroups are swept: if this lab runs
        the /dev/log listener, hand it to another instance that is up, else stop it."""
        shared = load_shared()
        dl = shared.get("devlog")
        if not dl or dl.get("name") != self.name:
            return
        pid = self._logger_pid(dl)
        others = {n: d for n, d in live_instances().items() if n != self.name}
        if pid is not None and others:
            self._hand_over_logger(shared, pid, *sorted(others.items())[0])
            return
        self._stop_logger(dl)
        shared.pop("devlog", None)
        save_shared(shared)

    def _hand_over_logger(self, shared: dict[str, Any], pid: int, name: str, d: Path) -> None:
        """Move the listener into the head cgroup and the pid file of lab ``name``."""
        for h in self.hierarchies:
            group = h.group(HEAD, name)
            group.mkdir(parents=True, exist_ok=True)
            (group / "cgroup.procs").write_text(f"{pid}\n")
        (d / "pids").mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file(d / "pids" / "syslog.pid", f"{pid}\n")
        shared["devlog"] = {**shared["devlog"], "name": name, "dir": str(d)}
        save_shared(shared)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pids" / "syslog.pid").unlink()
        self._children.pop(pid, None)
        log.info("syslog listener (pid %d) handed over to lab %s", pid, name)

    def _stop_logger(self, dl: Mapping[str, Any]) -> None:
        """Stop the listener ``dl`` (the shared file's record) and remove its /dev/log."""
        if self._logger_pid(dl) is not None:
            self._stop_pidfile(Path(dl["dir"]) / "pids" / "syslog.pid", signal.SIGTERM, True,
                               DOWN_TIMEOUT, str(dl["name"]))
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(DEV_LOG).st_ino == dl.get("ino"):
                DEV_LOG.unlink()

    def syslog(self) -> str:
        """What the lab's /dev/log listener got from this lab's nodes (and the host)."""
        try:
            text = (self.dir / "logs" / "syslog.log").read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if self._load_state().get("syslog") == "external":
            text = (f"(lab: {DEV_LOG} belongs to a syslog daemon the lab did not start: "
                    "messages logged in the nodes are in that daemon's logs)\n" + text)
        return text
