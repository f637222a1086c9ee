"""Admission of ssh logins: the agent's side of pam_adopt.py.

The PAM module (pam/pam_adopt.py, stdlib only) sends one AdmissionRequest as a JSON
line over a root-only Unix socket; the agent decides and, when the login belongs to a
job, adopts the calling process (sshd's privileged process for this login, whose pid
the kernel gives us with SO_PEERCRED) into every cgroup of that job, so the session and
everything it starts share the job's limits, accounting and end.

The decision, in order (the module has already ignored root and other services):

1. The user's jobs on this node: none -> `action_no_jobs` (deny, or ignore).
2. Exactly one -> adopt into it; no network call.
3. Several -> ask the agent on the source node (the client's address in SSH_CONNECTION)
   which job owns the connection, with a deadline inside the module's timeout. If that
   job is one of the user's jobs here -> adopt into it. Otherwise (job-less process,
   another job, source agent down or silent) -> `action_unknown`: `newest` adopts into
   the most recently started of the user's jobs, `allow` admits without adoption,
   `deny` refuses.
4. Adoption failing -> `action_adopt_failure` (deny, or allow without adoption).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format

import callerid
from node_agent import metrics
from node_agent.errors import ImpostorError
from node_agent.proto.v1 import admission_pb2 as apb
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.registry import JobRecord, JobRegistry
from node_agent.warmup import MigrationWarmer

log = logging.getLogger("node_agent.admission")
security = logging.getLogger("node_agent.security")

MAX_REQUEST = 64 * 1024
DEFAULTS = {"action_no_jobs": "deny", "action_unknown": "newest",
            "action_adopt_failure": "deny"}
CHOICES = {"action_no_jobs": ("deny", "ignore"),
           "action_unknown": ("newest", "allow", "deny"),
           "action_adopt_failure": ("deny", "allow")}
DEFAULT_TIMEOUT = 5.0  # pam_adopt's default timeout=, for a request that names none
CALL_SHARE = 0.6  # of the module's timeout, for the caller-ID call
MIN_CALL = 0.05  # seconds: less than that left, and the call is not even tried
ADOPTED_LEAF = "adopted"

MSG_NO_JOBS = "Access denied by pam_adopt: you have no active jobs on this node"
MSG_UNKNOWN = ("Access denied by pam_adopt: this connection does not come from one of "
               "your jobs on this node")
MSG_ADOPT_FAILED = "Access denied by pam_adopt: your session could not be added to your job"
MSG_BAD_REQUEST = "Access denied by pam_adopt: internal error"

ALLOW, DENY, IGNORE = (apb.AdmissionReply.ALLOW, apb.AdmissionReply.DENY,
                       apb.AdmissionReply.IGNORE)


@dataclass(frozen=True)
class Peer:
    """The caller as the kernel saw it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


# CallerIdFn(source_ip, connection, deadline_seconds) -> job id or None (raises grpc.RpcError)
CallerIdFn = Callable[[str, pb.Connection, float], "str | None"]


def options_of(request: apb.AdmissionRequest) -> dict[str, str]:
    """The request's options, each valid or replaced by its default (and logged)."""
    opts = {}
    for key, default in DEFAULTS.items():
        value = getattr(request.options, key) or default
        if value not in CHOICES[key]:
            log.warning("admission: %s=%r is not one of %s; using %s", key, value,
                        "|".join(CHOICES[key]), default)
            value = default
        opts[key] = value
    return opts


def parse_ssh_connection(text: str) -> pb.Connection | None:
    """"src_ip src_port dst_ip dst_port" -> Connection, or None when absent/garbled."""
    parts = text.split()
    if len(parts) != 4:
        return None
    try:
        src = callerid.Endpoint(callerid.normalize_ip(parts[0]), int(parts[1]))
        dst = callerid.Endpoint(callerid.normalize_ip(parts[2]), int(parts[3]))
    except ValueError:
        return None
    return pb.Connection(src_ip=str(src.ip), src_port=src.port, dst_ip=str(dst.ip),
                         dst_port=dst.port)


class Admission:
    """Decides one login (see the module docstring); thread-safe."""

    def __init__(self, registry: JobRegistry, caller_id: CallerIdFn, *,
                 rpc_timeout: float = 2.0, warmer: MigrationWarmer | None = None) -> None:
        self.registry = registry
        self.caller_id = caller_id
        self.rpc_timeout = rpc_timeout
        self.warmer = warmer

    def decide(self, request: apb.AdmissionRequest, peer: Peer,
               received: float | None = None) -> apb.AdmissionReply:
        """`received`: time.monotonic() when the request came in (default: now). The
        module's clock has been running since then, waiting for a worker included."""
        t0 = time.monotonic()
        if received is None or received > t0:
            received = t0
        reply = self._decide(request, peer, received)
        elapsed = time.monotonic() - received
        metrics.ADMISSIONS.labels(apb.AdmissionReply.Decision.Name(reply.decision),
                                  reply.reason).observe(elapsed)
        log.info("admission: %s from %s (%s) pid %d: %s %s%s (%.1f ms)%s", request.user,
                 request.rhost or "?", request.ssh_connection or "no SSH_CONNECTION", peer.pid,
                 apb.AdmissionReply.Decision.Name(reply.decision), reply.reason,
                 f" job {reply.job_id}" if reply.job_id else "",
                 elapsed * 1000,
                 f": {reply.detail}" if reply.detail else "")
        return reply

    def _decide(self, request: apb.AdmissionRequest, peer: Peer,
                received: float) -> apb.AdmissionReply:
        opts = options_of(request)
        jobs = self.registry.list_jobs(request.user)
        if not jobs:
            if opts["action_no_jobs"] == "ignore":
                return apb.AdmissionReply(decision=IGNORE, reason="no-jobs")
            return apb.AdmissionReply(decision=DENY, reason="no-jobs", message=MSG_NO_JOBS)
        if len(jobs) == 1:
            return self._adopt(jobs[0], peer, opts, "one-job")
        conn = parse_ssh_connection(request.ssh_connection)
        detail = ""
        # The call gets at most 60 % of the module's timeout, counted from the request's
        # arrival: the rest is for the adoption, the reply, and a busy machine.
        waited = time.monotonic() - received
        budget = (request.options.timeout or DEFAULT_TIMEOUT) * CALL_SHARE - waited
        if conn is None:
            detail = f"no usable SSH_CONNECTION ({request.ssh_connection!r})"
        elif budget < MIN_CALL:
            detail = (f"no time left to ask {conn.src_ip} for the caller's job (the request "
                      f"waited {waited * 1000:.0f} ms for the agent)")
        else:
            deadline = min(self.rpc_timeout, budget)
            if self.warmer is not None:
                self.warmer.kick()  # overlap the kernel's migration toll with the call
            t_call = time.perf_counter()
            try:
                job_id = self.caller_id(conn.src_ip, conn, deadline)
            except grpc.RpcError as e:
                detail = (f"caller ID from {conn.src_ip} failed: {e.code().name}: "
                          f"{e.details()}")
            except ImpostorError as e:  # not the agent (auth.CredentialPlugin): ignore it
                security.warning("SECURITY: caller ID for %s's login: %s", request.user, e)
                detail = f"caller ID from {conn.src_ip} refused: {e}"
            except Exception as e:  # a bug here must not become a hung or failed login
                log.exception("admission: caller ID from %s", conn.src_ip)
                detail = f"caller ID from {conn.src_ip} failed: {e}"
            else:
                mine = {r.job.id: r for r in jobs}
                if job_id in mine:
                    took = (time.perf_counter() - t_call) * 1000
                    return self._adopt(mine[job_id], peer, opts, "caller-id",
                                       f"caller ID from {conn.src_ip}: {took:.1f} ms")
                detail = (f"the source node says job {job_id}, not one of "
                          f"{request.user}'s jobs here" if job_id
                          else "the source node knows no job for this connection")
        how = opts["action_unknown"]
        if how == "newest":
            newest = max(jobs, key=lambda r: (r.job.start_time, r.job.id))
            return self._adopt(newest, peer, opts, "unknown-newest", detail)
        if how == "allow":
            return apb.AdmissionReply(decision=ALLOW, reason="unknown-allow", detail=detail)
        return apb.AdmissionReply(decision=DENY, reason="unknown-deny", message=MSG_UNKNOWN,
                                  detail=detail)

    def _adopt(self, rec: JobRecord, peer: Peer, opts: dict[str, str], reason: str,
               detail: str = "") -> apb.AdmissionReply:
        job = rec.job
        t0 = time.perf_counter()
        try:
            self.registry.layout.attach(job.id, peer.pid, leaf=ADOPTED_LEAF)
        except (callerid.CgroupError, OSError, ValueError) as e:
            log.error("admission: adopting pid %d into job %s failed: %s", peer.pid, job.id, e)
            why = f"adoption into job {job.id} failed: {e}"
            if opts["action_adopt_failure"] == "allow":
                return apb.AdmissionReply(decision=ALLOW, reason="adopt-failed-allow",
                                          detail=why)
            return apb.AdmissionReply(decision=DENY, reason="adopt-failed",
                                      message=MSG_ADOPT_FAILED, detail=why)
        # The first cgroup migration after a quiet spell waits for an RCU grace period
        # (cgroup_threadgroup_rwsem): several ms that show here, not in the lookup.
        took = f"adopt {(time.perf_counter() - t0) * 1000:.1f} ms"
        return apb.AdmissionReply(
            decision=ALLOW, reason=reason, job_id=job.id,
            detail=f"{detail}; {took}" if detail else took,
            env={"CALLERID_JOB_ID": job.id, "CALLERID_NODE": self.registry.node})


def _peercred(conn: socket.socket) -> Peer:
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


def _reply_line(reply: apb.AdmissionReply) -> bytes:
    return (json_format.MessageToJson(reply, preserving_proto_field_name=True, indent=None)
            + "\n").encode()


class AdmissionServer:
    """The root-only Unix socket: one request line in, one reply line out, per connection.

    One thread accepts connections and reads their request lines (never blocking on a
    slow client); a complete request goes to a worker pool with the time it arrived, so
    that the decision knows how much of the module's timeout is left. A connection that
    sends nothing for `io_timeout` seconds is dropped.
    """

    def __init__(self, path: str, admission: Admission, *, workers: int = 32,
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
        self._reading: dict[socket.socket, _Reading] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="admission")
        self._thread = threading.Thread(target=self._loop, name="admission-io", daemon=True)
        self._closing = False

    def start(self) -> None:
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
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: wait a little, not in a busy loop
                if not self._closing:
                    log.error("admission: accept failed: %s", e)
                    time.sleep(0.1)
                return
            try:
                self._admit(conn)
            except Exception as e:  # OSError from SO_PEERCRED, or a bug: drop this one only
                log.warning("admission: connection dropped: %s", e)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        peer = _peercred(conn)
        if peer.uid != 0:
            self._pool.submit(self._refuse, conn, peer)
            return
        if self.admission.warmer is not None:
            # Most requests end in an adoption: start the kernel's lock switch now
            # (if the login watch has not already), while the request is read.
            self.admission.warmer.kick()
            self.admission.warmer.login_arrived()
        self._selector.register(conn, selectors.EVENT_READ, None)
        self._reading[conn] = _Reading(peer, time.monotonic() + self.io_timeout)

    def _read(self, conn: socket.socket) -> None:
        reading = self._reading[conn]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("admission: connection dropped: %s", e)
            self._forget(conn).close()
            return
        reading.buf += chunk
        if chunk and b"\n" not in chunk:
            if len(reading.buf) > MAX_REQUEST:
                log.error("admission: request from pid %d longer than %d bytes: dropped",
                          reading.peer.pid, MAX_REQUEST)
                self._forget(conn).close()
            return
        self._forget(conn)
        line = reading.buf.split(b"\n", 1)[0]
        if not line.strip():
            # pam_adopt.py connects before it knows whether it will ask (root, another
            # service): a connection closed without a request is normal.
            log.debug("admission: pid %d closed without a request", reading.peer.pid)
            conn.close()
            return
        self._pool.submit(self._answer, conn, reading.peer, line, time.monotonic())

    def _forget(self, conn: socket.socket) -> socket.socket:
        self._selector.unregister(conn)
        del self._reading[conn]
        return conn

    def _next_expiry(self) -> float | None:
        if not self._reading:
            return None
        soonest = min(r.expires for r in self._reading.values())
        return max(0.0, soonest - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, reading in list(self._reading.items()):
            if reading.expires <= now:
                log.warning("admission: pid %d sent no request within %g s: dropped",
                            reading.peer.pid, self.io_timeout)
                self._forget(conn).close()

    # -- the workers ---------------------------------------------------------------------
    def _refuse(self, conn: socket.socket, peer: Peer) -> None:
        security.warning("SECURITY: admission request from uid %d pid %d refused: "
                         "only root may ask", peer.uid, peer.pid)
        self._send(conn, apb.AdmissionReply(decision=DENY, reason="not-root",
                                            message=MSG_BAD_REQUEST))

    def _answer(self, conn: socket.socket, peer: Peer, line: bytes, received: float) -> None:
        try:
            request = apb.AdmissionRequest()
            try:
                json_format.Parse(line, request)
            except Exception as e:  # ParseError, or TypeError for a non-object ("[]")
                log.error("admission: malformed request from pid %d: %s", peer.pid, e)
                reply = apb.AdmissionReply(decision=DENY, reason="bad-request",
                                           message=MSG_BAD_REQUEST, detail=str(e))
            else:
                if not request.user:
                    log.error("admission: request from pid %d names no user", peer.pid)
                    reply = apb.AdmissionReply(decision=DENY, reason="bad-request",
                                               message=MSG_BAD_REQUEST, detail="no user")
                else:
                    reply = self.admission.decide(request, peer, received)
        except Exception as e:
            # A bug must not look like a silent agent to the module: say so, and deny.
            log.exception("admission: request from pid %d failed", peer.pid)
            reply = apb.AdmissionReply(decision=DENY, reason="internal-error",
                                       message=MSG_BAD_REQUEST, detail=str(e))
        self._send(conn, reply)

    def _send(self, conn: socket.socket, reply: apb.AdmissionReply) -> None:
        with conn:
            try:
                conn.setblocking(True)
                conn.settimeout(self.io_timeout)
                conn.sendall(_reply_line(reply))
            except OSError as e:
                log.warning("admission: connection dropped: %s", e)

    def close(self) -> None:
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._selector.close()
        for conn in self._reading:
            conn.close()
        self._reading.clear()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class _Reading:
    """A connection whose request line is still coming."""

    peer: Peer
    expires: float
    buf: bytes = b""
