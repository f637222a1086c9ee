"""Admission of ssh logins: the agent's side of pam_adopt.py.

The PAM module (pam/pam_adopt.py, stdlib only) sends one request over a root-only Unix
socket, in the wire format that node_agent/pamcontract.py defines with the rest of the
contract (options, defaults, messages); the agent decides and, when the login belongs to
a job, adopts the calling process (sshd's privileged process for this login, whose pid
the kernel gives us with SO_PEERCRED) into every cgroup of that job, so the session and
everything it starts share the job's limits, accounting and end.

The decision, in order (the module has already ignored root and other services):

1. The user's running jobs on this node (a job that is ending attracts nothing):
   none -> `action_no_jobs` (deny, or ignore).
2. Exactly one -> adopt into it; no network call.
3. Several -> ask the agent on the source node (the client's address in SSH_CONNECTION)
   which job owns the connection, with a deadline inside the module's timeout. If that
   job is one of the user's jobs here -> adopt into it. Otherwise (job-less process,
   another job, source agent down or silent) -> `action_unknown`: `newest` adopts into
   the most recently started of the user's jobs, `allow` admits without adoption,
   `deny` refuses.
4. Adoption failing -> `action_adopt_failure` (deny, or allow without adoption).
5. Adopted, and the module asked for the job's namespaces (`join_container=true`): the
   backend's fds of the job's namespaces that differ from the agent's go with the reply
   (SCM_RIGHTS, `namespaces=` naming them), and the module enters them. Not getting them
   is an adoption failure (pam_slurm_adopt's rule when the stepd cannot give its fd);
   the agent closes its copies once the reply is sent, or not sent, in every case.

A request naming another node (the module's `nodename=`) than the agent's is refused
before anything else: the agent serves its own node only.

Only while the module still waits. A request is acted on only while the module that
sent it waits for the answer; otherwise it is dropped, logged on one line, and nothing is
done for it (no remote call, no adoption, no answer). Checked when the request is read,
when a worker takes it, before the caller-ID call and right before the adoption:

* its deadline (the module's own, on the machine's CLOCK_MONOTONIC, sent in the request;
  for a request without one, `timeout` counted from when the agent read it), so a
  request read late (the agent stopped, a full machine) is not served after the module
  gave up;
* the connection: the module closes it when it gives up;
* the calling process, through a pidfd of the connection's peer (SO_PEERPIDFD: the
  process that connected, whenever it is asked; on kernels before 6.5, pidfd_open of
  its pid at accept): once that process has exited its pid may name another process,
  which must never be moved into a job.

Fairness. Decisions run on a pool of workers shared by all users, but one user has at
most `PER_USER` decisions in flight; that user's other requests wait in a FIFO of their
own, and a free worker serves the users in turn. So one user's logins that wait on a
slow or silent source node (each up to 60 % of the module's timeout) hold at most
`PER_USER` workers, and another user's login gets a worker at once.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

import callerid
from node_agent import jobenv, pamcontract
from node_agent.agent import metrics
from node_agent.agent.warmup import MigrationWarmer
from node_agent.errors import ImpostorError
from node_agent.jobs.base import RUNNING, JobBackend, JobRecord
from node_agent.pamcontract import (
    ALLOW,
    DENY,
    IGNORE,
    MSG_ADOPT_FAILED,
    MSG_BAD_REQUEST,
    MSG_BUSY,
    MSG_NO_JOBS,
    MSG_UNKNOWN,
    Reply,
    Request,
)

log = logging.getLogger("node_agent.agent.admission")
security = logging.getLogger("node_agent.security")

MAX_REQUEST = 64 * 1024
CALL_SHARE = 0.6  # of the module's timeout, for the caller-ID call
MIN_CALL = 0.05  # seconds: less than that left, and the call is not even tried

# The admission pool. A decision is either quick (the job backend, then one cgroup write per
# hierarchy: well under a millisecond, up to ~1 s when the kernel's cgroup lock waits
# behind a burst's forks) or waits on the source node's agent, up to
# min(rpc_timeout, 60 % of the module's timeout): 2 s by default.
# - PER_USER = 8: one user's logins stuck on a slow or silent source hold at most 8
#   workers, an eighth of the pool: 8 users would need that at once to fill it. 8 in
#   flight keep one user's burst quick: the cgroup writes of all logins take the kernel's
#   one global lock in turn, so more of them in parallel finish no sooner, and a caller-ID
#   call takes a few ms, so 8 serve well over a thousand logins a second, more than sshd
#   lets through on a node (a 200-login burst takes ~23 s,
#   tests/benchmarks/bench_login_burst.py). Against a source answering slowly (1 s), 8 a
#   second get their answer; the user's later requests, once 60 % of their timeout has
#   gone by in the queue, skip the call and follow `action_unknown`, as before.
# - WORKERS = 64: threads that mostly wait (on the network or the kernel's lock).
# - WAITING_PER_USER = 256: a user's requests waiting beyond their PER_USER in flight;
#   each holds a descriptor (two on kernels before 6.5: the pidfd is then taken at
#   accept), and one user must not use up the agent's descriptors, and so its accepts,
#   for everyone. A 200-login burst of one user fits; past it the login is refused at
#   once, with a log line.
WORKERS = 64
PER_USER = 8
WAITING_PER_USER = 256

# SO_PEERPIDFD (Linux 6.5): a pidfd of the peer the kernel recorded at connect(), so no
# pid can be recycled in between, however late it is asked. 77 in asm-generic/socket.h,
# which the architectures listed use; Python 3.11 has no constant for it.
SO_PEERPIDFD: int | None = getattr(socket, "SO_PEERPIDFD", None)
if SO_PEERPIDFD is None and os.uname().machine in (
        "x86_64", "aarch64", "i686", "i386", "armv7l", "armv8l", "riscv64", "ppc64le",
        "ppc64", "s390x", "loongarch64"):
    SO_PEERPIDFD = 77


@dataclass(frozen=True)
class Peer:
    """The caller as the kernel saw it (SO_PEERCRED), and a pidfd of it when there is one
    (it stays the same process whatever happens to the pid)."""

    pid: int
    uid: int
    gid: int
    pidfd: int | None = None


# CallerIdFn(source node, connection, deadline_seconds) -> job id or None (raises
# grpc.RpcError): client.PeerPool.caller_id.
CallerIdFn = Callable[[str, callerid.Connection, float], "str | None"]


class Dropped(Exception):
    """A request the module no longer waits for: nothing was done for it, and it gets no
    answer. `tag` names the reason for metrics: expired, hung-up, caller-exited."""

    def __init__(self, tag: str, why: str) -> None:
        super().__init__(why)
        self.tag = tag


def options_of(request: Request) -> dict[str, str]:
    """The request's options, each valid or replaced by its default (and logged)."""
    opts = {}
    for key in pamcontract.AGENT_OPTIONS:
        default, allowed = pamcontract.CHOICES[key]
        value = getattr(request, key) or default
        if value not in allowed:
            log.warning("admission: %s=%r is not one of %s; using %s", key, value,
                        "|".join(allowed), default)
            value = default
        opts[key] = value
    return opts


def parse_ssh_connection(text: str) -> callerid.Connection | None:
    """"src_ip src_port dst_ip dst_port" -> the connection to look up on the source node
    (the client's end is local there), or None when absent/garbled. From here to the
    source node's lookup the connection stays a callerid.Connection (the client turns it
    into the message once: node_agent/pbconv.py)."""
    parts = text.split()
    if len(parts) != 4:
        return None
    try:
        src = callerid.Endpoint(callerid.normalize_ip(parts[0]), int(parts[1]))
        dst = callerid.Endpoint(callerid.normalize_ip(parts[2]), int(parts[3]))
    except ValueError:
        return None
    return callerid.Connection.from_ssh_connection(src, dst)


def _time_ns(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/time")
    except OSError:
        return None
    return st.st_dev, st.st_ino


_OWN_TIME_NS = _time_ns("self")


def same_clock(pid: int) -> bool:
    """Whether `pid` reads the agent's CLOCK_MONOTONIC. All processes of a machine do,
    except in another time namespace (Linux 5.6), which offsets that clock. A process
    already gone, or a kernel without time namespaces: the same clock (a gone caller is
    caught by its pidfd)."""
    theirs = _time_ns(pid)
    return theirs is None or _OWN_TIME_NS is None or theirs == _OWN_TIME_NS


def module_timeout(request: Request) -> float:
    """The module's timeout= (pam_adopt only sends values in (0, MAX_TIMEOUT])."""
    t = request.timeout
    ok = math.isfinite(t) and 0 < t <= pamcontract.MAX_TIMEOUT
    return t if ok else pamcontract.DEFAULT_TIMEOUT


def deadline_of(request: Request, peer: Peer, received: float) -> float:
    """When the module stops waiting, on the agent's time.monotonic().

    The module sends its own deadline (its start of the exchange plus its timeout); it
    cannot be later than `received` plus the timeout, since the module started before
    the agent read the request, so that bounds it. A request may carry none, and a
    module in another time namespace sends one on another clock: for those the timeout
    counts from `received`, the best the agent knows.
    """
    latest = received + module_timeout(request)
    sent = request.deadline
    if not sent or not math.isfinite(sent) or not same_clock(peer.pid):
        return latest
    return min(sent, latest)


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (a zombie included)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


@dataclass
class _Ask:
    """One request being decided, and how to tell whether its module still waits."""

    request: Request
    peer: Peer
    received: float
    deadline: float
    hung_up: Callable[[], bool]
    namespaces: list[int] | None = None  # decide()'s

    @property
    def timeout(self) -> float:
        return module_timeout(self.request)

    def check(self, before: str) -> None:
        """Raise Dropped unless the module still waits for this answer."""
        now = time.monotonic()
        if now >= self.deadline:
            raise Dropped("expired", f"the module's deadline passed "
                          f"{(now - self.deadline) * 1000:.0f} ms ago, {before}")
        if self.hung_up():
            raise Dropped("hung-up", f"the module closed the connection (it gave up), "
                          f"{before}")
        if self.peer.pidfd is not None and pidfd_exited(self.peer.pidfd):
            raise Dropped("caller-exited", f"the asking process {self.peer.pid} has exited, "
                          f"{before}")


class Admission:
    """Decides one login (see the module docstring); thread-safe."""

    def __init__(self, jobs: JobBackend, caller_id: CallerIdFn, *,
                 rpc_timeout: float = 2.0, warmer: MigrationWarmer | None = None) -> None:
        self.jobs = jobs
        self.caller_id = caller_id
        self.rpc_timeout = rpc_timeout
        self.warmer = warmer

    def decide(self, request: Request, peer: Peer,
               received: float | None = None,
               hung_up: Callable[[], bool] | None = None,
               namespaces: list[int] | None = None) -> Reply:
        """`received`: time.monotonic() when the request came in (default: now). The
        module's clock has been running since before then, waiting for a worker included.
        `hung_up()`: whether the module has closed the connection.
        `namespaces`: where the fds of the job's namespaces go, in the order of the reply's
        `namespaces`, when the request asks for them (join_container=true); the caller
        sends and closes them, also when this raises. None: they are not fetched.

        Raises Dropped (logged here) when the module no longer waits: nothing was done."""
        t0 = time.monotonic()
        if received is None or received > t0:
            received = t0
        ask = _Ask(request, peer, received, deadline_of(request, peer, received),
                   hung_up or (lambda: False), namespaces)
        try:
            reply = self._decide(ask)
        except Dropped as e:
            self.log_dropped(request, peer, received, e)
            raise
        elapsed = time.monotonic() - received
        metrics.ADMISSIONS.labels(reply.decision,
                                  reply.reason).observe(elapsed)
        log.info("admission: %s from %s (%s) pid %d: %s %s%s (%.1f ms)%s", request.user,
                 request.rhost or "?", request.ssh_connection or "no SSH_CONNECTION", peer.pid,
                 reply.decision, reply.reason,
                 f" job {reply.job_id}" if reply.job_id else "",
                 elapsed * 1000,
                 f": {reply.detail}" if reply.detail else "")
        return reply

    def check_arrival(self, request: Request, peer: Peer,
                      received: float) -> None:
        """Raise Dropped (logged) when the request was already stale when it was read:
        an agent that was stopped finds the modules' requests in its socket's queue."""
        ask = _Ask(request, peer, received, deadline_of(request, peer, received),
                   lambda: False)
        try:
            ask.check("when the agent read it")
        except Dropped as e:
            self.log_dropped(request, peer, received, e)
            raise

    @staticmethod
    def log_dropped(request: Request, peer: Peer, received: float,
                    e: Dropped) -> None:
        """Log (and count) a request dropped unanswered: its deadline passed or its module
        gave up."""
        elapsed = time.monotonic() - received
        metrics.ADMISSIONS.labels("DROPPED", e.tag).observe(elapsed)
        log.warning("admission: %s from %s (%s) pid %d: dropped, nothing done: %s "
                    "(%.1f ms after it was read)", request.user, request.rhost or "?",
                    request.ssh_connection or "no SSH_CONNECTION", peer.pid, e,
                    elapsed * 1000)

    def _decide(self, ask: _Ask) -> Reply:
        request = ask.request
        ask.check("before deciding")
        if request.nodename and request.nodename != self.jobs.node:
            why = (f"pam_adopt's nodename={request.nodename} is not this agent's node "
                   f"{self.jobs.node}: fix the PAM line, or the agent's node name "
                   "(agent.toml: node_name, or [slurm] nodename)")
            log.error("admission: %s's login refused: %s", request.user, why)
            return Reply(decision=DENY, reason="wrong-node", message=MSG_BAD_REQUEST,
                         detail=why)
        opts = options_of(request)
        # An ending job must attract no login: its processes are being killed, and one
        # adopted now would escape that or keep the job from going away.
        jobs = [r for r in self.jobs.list_jobs(request.user) if r.state == RUNNING]
        if not jobs:
            why = self.jobs.why_no_jobs()   # e.g. Slurm without PrologFlags=contain
            if opts["action_no_jobs"] == "ignore":
                return Reply(decision=IGNORE, reason="no-jobs", detail=why)
            return Reply(decision=DENY, reason="no-jobs", message=MSG_NO_JOBS, detail=why)
        if len(jobs) == 1:
            return self._adopt(jobs[0], ask, opts, "one-job")
        conn = parse_ssh_connection(request.ssh_connection)
        detail = ""
        # The source node: where the ssh client runs, the connection's local end there.
        source = str(conn.local.ip) if conn is not None else ""
        # The call ends at 60 % of the module's timeout, counted on the module's own
        # clock: the rest is for the adoption, the reply, and a busy machine.
        now = time.monotonic()
        waited = now - (ask.deadline - ask.timeout)
        budget = ask.deadline - (1 - CALL_SHARE) * ask.timeout - now
        if conn is None:
            detail = f"no usable SSH_CONNECTION ({request.ssh_connection!r})"
        elif budget < MIN_CALL:
            detail = (f"no time left to ask {source} for the caller's job (the request "
                      f"waited {waited * 1000:.0f} ms for the agent)")
        else:
            ask.check(f"before asking {source}")
            deadline = min(self.rpc_timeout, budget)
            if self.warmer is not None:
                self.warmer.kick()  # overlap the kernel's migration toll with the call
            t_call = time.perf_counter()
            try:
                job_id = self.caller_id(source, conn, deadline)
            except grpc.RpcError as e:
                detail = (f"caller ID from {source} failed: {e.code().name}: "
                          f"{e.details()}")
            except ImpostorError as e:  # not the agent (auth.CredentialPlugin): ignore it
                security.warning("SECURITY: caller ID for %s's login: %s", request.user, e)
                detail = f"caller ID from {source} refused: {e}"
            except Exception as e:  # a bug here must not become a hung or failed login
                log.exception("admission: caller ID from %s", source)
                detail = f"caller ID from {source} failed: {e}"
            else:
                mine = {r.job.id: r for r in jobs}
                if job_id in mine:
                    took = (time.perf_counter() - t_call) * 1000
                    return self._adopt(mine[job_id], ask, opts, "caller-id",
                                       f"caller ID from {source}: {took:.1f} ms")
                detail = (f"the source node says job {job_id}, not one of "
                          f"{request.user}'s running jobs here" if job_id
                          else "the source node knows no job for this connection")
        how = opts["action_unknown"]
        if how == "newest":
            newest = self.jobs.newest(jobs)
            return self._adopt(newest, ask, opts, "unknown-newest", detail)
        if how == "allow":
            return Reply(decision=ALLOW, reason="unknown-allow", detail=detail)
        return Reply(decision=DENY, reason="unknown-deny", message=MSG_UNKNOWN,
                     detail=detail)

    def _adopt(self, rec: JobRecord, ask: _Ask, opts: dict[str, str], reason: str,
               detail: str = "") -> Reply:
        job = rec.job
        peer = ask.peer
        ask.check(f"before adopting into job {job.id}")
        # Race: the job may have started ending since the list was read.
        now = self.jobs.get(job.id)
        failure = "" if now is not None and now.state == "running" else (
            f"job {job.id} is {now.state if now else 'gone'}")
        t0 = time.perf_counter()
        if not failure:
            # The process moved is the one that asked: `check` just saw it alive through
            # its pidfd, so until it exits its pid names nothing else. What remains is
            # the time from that check to the kernel's lookup of the pid in each
            # cgroup.procs write (microseconds; up to an RCU grace period, 5-15 ms, while
            # the kernel switches its cgroup lock, during which forks go on). For another
            # process to be moved, the caller (a process waiting for this answer) would
            # have to exit, be reaped, and the kernel hand out its pid again, which it
            # does only after going round all of pid_max (at least 32768) in that time.
            # The check after the move below proves it for the common case.
            try:
                self.jobs.adopt(job.id, peer.pid)
            except (callerid.CgroupError, OSError, ValueError) as e:
                failure = str(e)
        if failure:
            log.error("admission: adopting pid %d into job %s failed: %s", peer.pid, job.id,
                      failure)
            why = f"adoption into job {job.id} failed: {failure}"
            if opts["action_adopt_failure"] == "allow":
                return Reply(decision=ALLOW, reason="adopt-failed-allow",
                             detail=why)
            return Reply(decision=DENY, reason="adopt-failed",
                         message=MSG_ADOPT_FAILED, detail=why)
        if peer.pidfd is not None and pidfd_exited(peer.pidfd):
            # Alive before and after the writes means every write found the caller.
            # Here it exited meanwhile: harmless unless its pid was also reused at once.
            log.warning("admission: pid %d exited while it was being adopted into job %s",
                        peer.pid, job.id)
        # The first cgroup migration after a quiet spell waits for an RCU grace period
        # (cgroup_threadgroup_rwsem): several ms that show here, not in the lookup.
        took = f"adopt {(time.perf_counter() - t0) * 1000:.1f} ms"
        detail = f"{detail}; {took}" if detail else took
        env = jobenv.of_job(job.id, self.jobs.node)
        kinds: tuple[str, ...] = ()
        if ask.namespaces is not None and ask.request.join_container == "true":
            try:
                got = self.jobs.namespaces(job.id)
            except (OSError, ValueError) as e:
                # pam_slurm_adopt: the job's namespace not had is an adoption failure. The
                # process is in the job's cgroups already (its end still applies).
                why = f"adopted into job {job.id}, but its namespaces: {e}"
                log.error("admission: pid %d: %s", peer.pid, why)
                if opts["action_adopt_failure"] == "allow":
                    return Reply(decision=ALLOW, reason="join-failed-allow", job_id=job.id,
                                 detail=f"{detail}; {why}", env=env)
                return Reply(decision=DENY, reason="join-failed", message=MSG_ADOPT_FAILED,
                             detail=f"{detail}; {why}")
            ask.namespaces.extend(fd for _kind, fd in got)
            kinds = tuple(kind for kind, _fd in got)
            if kinds:
                detail += f"; namespaces {','.join(kinds)}"
        return Reply(decision=ALLOW, reason=reason, job_id=job.id, detail=detail, env=env,
                     namespaces=kinds)


def _peercred(conn: socket.socket) -> Peer:
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


def peer_pidfd_works() -> bool:
    """Whether this kernel gives a pidfd of a Unix socket's peer (SO_PEERPIDFD, 6.5)."""
    if SO_PEERPIDFD is None:
        return False
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.close(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


def _peer_pidfd(conn: socket.socket, pid: int, from_socket: bool) -> int:
    """A pidfd of the process that connected: from the socket (SO_PEERPIDFD), or else of
    its pid. Raises ProcessLookupError when it has already exited."""
    if from_socket:
        assert SO_PEERPIDFD is not None
        try:
            fd: int = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
            return fd
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EINVAL):  # 6.5-6.8: the peer is gone
                raise ProcessLookupError(e.errno, f"pid {pid} has exited") from None
            raise
    # By pid (before 6.5), taken at accept: the pid may have been reused between
    # connect() and here, which is microseconds while the agent keeps up. (An agent
    # that was stopped meanwhile reads a request its module gave up on: that one is
    # caught by its deadline and by its closed connection.)
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessLookupError(e.errno, f"pid {pid} has exited") from None
        raise


def pidfds_work() -> bool:
    """Whether this kernel has pidfd_open (5.3)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return False
    return True


def _hung_up(conn: socket.socket) -> bool:
    """The module closed its end (it gave up). A half-close (shutdown of its writing
    side) is not giving up: only POLLHUP, both directions gone, or an error."""
    p = select.poll()
    p.register(conn, select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, ev in p.poll(0))


@dataclass
class _Conn:
    """One connection from the module: while its request line comes, then while it
    waits for a worker and is decided. Owns the socket and the peer's pidfd."""

    sock: socket.socket
    peer: Peer
    expires: float  # the request line must be complete by then
    buf: bytes = b""
    request: Request = field(default_factory=Request)
    received: float = 0.0
    refused: bool = False  # not root: read its line, then refuse it
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if self.peer.pidfd is not None:
            os.close(self.peer.pidfd)
            self.peer = replace(self.peer, pidfd=None)


class FairPool:
    """`workers` threads shared by keys (users): at most `per_key` items of one key run at
    once, its other items wait in that key's FIFO (at most `waiting_per_key` of them),
    and a free worker takes the oldest item of the next key in turn. A key whose items
    all run slowly thus holds `per_key` workers, never the pool, and a key with nothing
    running is served by the next free worker whatever the other keys have queued."""

    def __init__(self, handle: Callable[[_Conn], None], *, workers: int, per_key: int,
                 waiting_per_key: int, name: str = "admission") -> None:
        if workers < 1 or per_key < 1:
            raise ValueError("a pool needs at least one worker and one item per key")
        self._handle = handle
        self.workers = workers
        self.per_key = per_key
        self.waiting_per_key = waiting_per_key
        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque[_Conn]] = {}
        self._running: collections.Counter[str] = collections.Counter()
        # Keys with an item waiting and fewer than per_key running, in turn order.
        self._turns: dict[str, None] = {}
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        """Start the workers."""
        for t in self._threads:
            t.start()

    def submit(self, key: str, item: _Conn) -> bool:
        """Queue `item`; False (nothing queued) when `key` already has its maximum
        waiting."""
        with self._cond:
            queue = self._waiting.setdefault(key, collections.deque())
            if len(queue) >= self.waiting_per_key:
                return False
            queue.append(item)
            if self._running[key] < self.per_key:
                self._turns.setdefault(key, None)
                self._cond.notify()
        return True

    def load(self, key: str) -> tuple[int, int]:
        """(running, waiting) items of `key`."""
        with self._cond:
            return self._running[key], len(self._waiting.get(key, ()))

    def _take(self) -> tuple[str, _Conn] | None:
        with self._cond:
            while not self._turns and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            key = next(iter(self._turns))
            del self._turns[key]
            queue = self._waiting[key]
            item = queue.popleft()
            self._running[key] += 1
            if not queue:
                del self._waiting[key]
            elif self._running[key] < self.per_key:
                self._turns[key] = None  # at the back: every other key goes first
            if self._turns:
                self._cond.notify()  # more to take: an idle worker may be asleep
            return key, item

    def _done(self, key: str) -> None:
        with self._cond:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
            if key in self._waiting and key not in self._turns:
                self._turns[key] = None
                self._cond.notify()

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            key, item = taken
            try:
                self._handle(item)
            except Exception:  # the handler answers its own errors; this is a last guard
                log.exception("admission: worker failed")
                item.close()
            finally:
                self._done(key)

    def close(self) -> list[_Conn]:
        """Stop the workers (after their current item); the items never taken."""
        with self._cond:
            self._closing = True
            left = [item for queue in self._waiting.values() for item in queue]
            self._waiting.clear()
            self._turns.clear()
            self._cond.notify_all()
        return left


class AdmissionServer:
    """The root-only Unix socket: one request line in, one reply line out, per connection.

    One thread accepts connections (taking the caller's credentials) and reads their
    request lines, never blocking on a slow client; a complete request
    goes, with the time it arrived, to the user's queue of a FairPool. A connection that
    sends nothing for `io_timeout` seconds is dropped. Answers are written without
    blocking: a reply is one short line into a fresh connection's empty buffer.
    """

    def __init__(self, path: str, admission: Admission, *, workers: int = WORKERS,
                 per_user: int = PER_USER, waiting_per_user: int = WAITING_PER_USER,
                 io_timeout: float = 5.0) -> None:
        self.path = path
        self.admission = admission
        self.io_timeout = io_timeout
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if p.is_socket():
            p.unlink()  # stale, from a previous run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: root only
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(512)
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._reading: dict[socket.socket, _Conn] = {}
        # With SO_PEERPIDFD the pidfd is taken when the decision starts (one descriptor
        # less per waiting request); without, at accept, to keep pid reuse out.
        self._pidfd_from_socket = peer_pidfd_works()
        self._pidfd_at_accept = not self._pidfd_from_socket and pidfds_work()
        if not self._pidfd_from_socket:
            if self._pidfd_at_accept:
                log.info("admission: the kernel gives no pidfd of a socket's peer "
                         "(SO_PEERPIDFD, Linux 6.5): the caller's is taken by pid at accept")
            else:
                log.warning("admission: the kernel has no pidfds (Linux 5.3): a login whose "
                            "process exits is caught only by its deadline and its closed "
                            "connection")
        self._pool = FairPool(self._answer, workers=workers, per_key=per_user,
                              waiting_per_key=waiting_per_user)
        self._thread = threading.Thread(target=self._loop, name="admission-io", daemon=True)
        self._closing = False

    def start(self) -> None:
        """Start serving the socket (the workers and the I/O thread)."""
        self._pool.start()
        self._thread.start()

    # -- the I/O thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            try:
                events = self._selector.select(self._next_expiry())
            except OSError:
                if self._closing:
                    return
                log.exception("admission: select failed")
                time.sleep(0.1)
                continue
            for key, _ in events:
                if key.fileobj == self._wake_r:
                    return
                try:
                    if key.fileobj is self._sock:
                        self._accept()
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self._read(key.fileobj)
                except Exception:  # one bad connection must not stop the others' logins
                    log.exception("admission: I/O failed")
                    if isinstance(key.fileobj, socket.socket) and key.fileobj in self._reading:
                        self._forget(key.fileobj).close()
            self._expire()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: wait a little, not in a busy loop
                if not self._closing:
                    log.error("admission: accept failed: %s", e)
                    time.sleep(0.1)
                return
            try:
                self._admit(sock)
            except Exception as e:  # OSError from SO_PEERCRED, or a bug: drop this one only
                log.warning("admission: connection dropped: %s", e)
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = _peercred(sock)
        if peer.uid != 0:
            # Refused once its request line is in (or it closes): answering before would
            # race with its sending, which would then fail without telling it why.
            security.warning("SECURITY: admission request from uid %d pid %d refused: "
                             "only root may ask", peer.uid, peer.pid)
            self._watch(_Conn(sock, peer, time.monotonic() + self.io_timeout, refused=True))
            return
        if self._pidfd_at_accept:
            try:
                pidfd = _peer_pidfd(sock, peer.pid, from_socket=False)
            except ProcessLookupError:
                log.warning("admission: pid %d exited before its connection was accepted: "
                            "dropped, nothing done", peer.pid)
                sock.close()
                return
            peer = Peer(peer.pid, peer.uid, peer.gid, pidfd)
        if self.admission.warmer is not None:
            # Most requests end in an adoption: start the kernel's lock switch now
            # (if the login watch has not already), while the request is read.
            self.admission.warmer.kick()
            self.admission.warmer.login_arrived()
        self._watch(_Conn(sock, peer, time.monotonic() + self.io_timeout))

    def _watch(self, conn: _Conn) -> None:
        try:
            self._selector.register(conn.sock, selectors.EVENT_READ, None)
        except BaseException:
            conn.close()
            raise
        self._reading[conn.sock] = conn

    def _read(self, sock: socket.socket) -> None:
        conn = self._reading[sock]
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("admission: connection dropped: %s", e)
            self._forget(sock).close()
            return
        conn.buf += chunk
        if chunk and not pamcontract.complete(conn.buf):
            if len(conn.buf) > MAX_REQUEST:
                log.error("admission: request from pid %d longer than %d bytes: dropped",
                          conn.peer.pid, MAX_REQUEST)
                self._forget(sock).close()
            return
        self._forget(sock)
        data, conn.buf = conn.buf, b""
        if conn.refused:
            self._finish(conn, Reply(decision=DENY, reason="not-root",
                                     message=MSG_BAD_REQUEST))
            return
        if not data.strip():
            # pam_adopt.py connects before it knows whether it will ask (root, another
            # service): a connection closed without a request is normal.
            log.debug("admission: pid %d closed without a request", conn.peer.pid)
            conn.close()
            return
        conn.received = time.monotonic()
        self._queue(conn, data)

    def _queue(self, conn: _Conn, data: bytes) -> None:
        peer = conn.peer
        try:
            conn.request = pamcontract.decode_request(data)
        except pamcontract.VersionMismatch as e:
            # An upgrade half done: the module and this agent are of different versions.
            # The answer is no reply of any version: the module applies its
            # action_generic_failure and logs the answer's "version mismatch".
            log.error("admission: request from pid %d: %s; pam_adopt and this agent are "
                      "of different callerid-adopt versions: restart the agent after an "
                      "upgrade, or install the agent's module", peer.pid, e)
            metrics.ADMISSIONS.labels("DENY", "version-mismatch").observe(0.0)
            self._send(conn.sock, pamcontract.VERSION_MISMATCH_ANSWER, "version mismatch")
            conn.close()
            return
        except pamcontract.WireError as e:
            log.error("admission: malformed request from pid %d: %s", peer.pid, e)
            self._finish(conn, Reply(decision=DENY, reason="bad-request",
                                     message=MSG_BAD_REQUEST, detail=str(e)))
            return
        request = conn.request
        if not request.user:
            log.error("admission: request from pid %d names no user", peer.pid)
            self._finish(conn, Reply(decision=DENY, reason="bad-request",
                                     message=MSG_BAD_REQUEST, detail="no user"))
            return
        try:
            self.admission.check_arrival(request, peer, conn.received)
        except Dropped:
            conn.close()
            return
        if not self._pool.submit(request.user, conn):
            running, waiting = self._pool.load(request.user)
            log.warning("admission: %s from %s (%s) pid %d: refused: %d of %s's logins are "
                        "being decided and %d wait", request.user, request.rhost or "?",
                        request.ssh_connection or "no SSH_CONNECTION", peer.pid, running,
                        request.user, waiting)
            metrics.ADMISSIONS.labels("DENY", "busy").observe(0.0)
            self._finish(conn, Reply(decision=DENY, reason="busy",
                                     message=MSG_BUSY,
                                     detail=f"{waiting} logins waiting"))

    def _forget(self, sock: socket.socket) -> _Conn:
        self._selector.unregister(sock)
        return self._reading.pop(sock)

    def _next_expiry(self) -> float | None:
        if not self._reading:
            return None
        soonest = min(r.expires for r in self._reading.values())
        return max(0.0, soonest - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for sock, conn in list(self._reading.items()):
            if conn.expires <= now:
                log.warning("admission: pid %d sent no request within %g s: dropped",
                            conn.peer.pid, self.io_timeout)
                self._forget(sock).close()

    # -- the workers ---------------------------------------------------------------------
    def _answer(self, conn: _Conn) -> None:
        if self._pidfd_from_socket:
            try:
                pidfd = _peer_pidfd(conn.sock, conn.peer.pid, from_socket=True)
            except ProcessLookupError:
                self.admission.log_dropped(conn.request, conn.peer, conn.received, Dropped(
                    "caller-exited", f"the asking process {conn.peer.pid} has exited, "
                    "before deciding"))
                conn.close()
                return
            except OSError as e:
                log.error("admission: no pidfd of pid %d (%s): deciding without checking "
                          "it is alive", conn.peer.pid, e)
                pidfd = None
            conn.peer = replace(conn.peer, pidfd=pidfd)
        fds: list[int] = []  # the job's namespaces, for the module: closed here, always
        try:
            try:
                reply = self.admission.decide(conn.request, conn.peer, conn.received,
                                              hung_up=lambda: _hung_up(conn.sock),
                                              namespaces=fds)
            except Dropped:  # logged by decide; the module no longer waits for anything
                conn.close()
                return
            except Exception as e:
                # A bug must not look like a silent agent to the module: say so, and deny.
                log.exception("admission: request from pid %d failed", conn.peer.pid)
                reply = Reply(decision=DENY, reason="internal-error",
                              message=MSG_BAD_REQUEST, detail=str(e))
            self._finish(conn, reply, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _finish(self, conn: _Conn, reply: Reply, fds: list[int] | None = None) -> None:
        """Send the reply and close the connection. `fds` go with it only when it is an
        adopting reply that names them (`namespaces`), one for each; the caller closes
        them."""
        send_fds: list[int] = []
        if fds and reply.decision == ALLOW and reply.job_id and \
                len(reply.namespaces) == len(fds):
            send_fds = fds
        elif fds or reply.namespaces:  # a bug: never an fd the reply does not explain
            log.error("admission: pid %d: %d namespace fds for a %s reply naming %s: "
                      "sent without them", conn.peer.pid, len(fds or ()), reply.decision,
                      ",".join(reply.namespaces) or "none")
            reply = replace(reply, namespaces=())
        self._send(conn.sock, pamcontract.encode_reply(reply), reply.decision, send_fds)
        conn.close()

    @staticmethod
    def _send(sock: socket.socket, data: bytes, what: str,
              fds: list[int] | None = None) -> None:
        try:
            # Non-blocking: a worker never waits for a client. The fds go in the same
            # sendmsg as the bytes: attached to the reply's first byte, they reach the
            # module with its first read of the reply.
            if fds:
                sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack(f"{len(fds)}i", *fds))])
            else:
                sent = sock.send(data)
        except OSError as e:  # the module gave up meanwhile (EPIPE), or a full buffer
            log.warning("admission: connection dropped before the answer (%s): %s",
                        what, e)
            return
        if sent < len(data):
            log.warning("admission: connection dropped: the answer did not fit its buffer")

    def close(self) -> None:
        """Stop serving: close the socket and every connection, join the threads."""
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._selector.close()
        for conn in self._reading.values():
            conn.close()
        self._reading.clear()
        for conn in self._pool.close():
            conn.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
