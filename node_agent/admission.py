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
DEFAULT_TIMEOUT = 2.0
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

    def decide(self, request: apb.AdmissionRequest, peer: Peer) -> apb.AdmissionReply:
        t0 = time.perf_counter()
        reply = self._decide(request, peer)
        elapsed = time.perf_counter() - t0
        metrics.ADMISSIONS.labels(apb.AdmissionReply.Decision.Name(reply.decision),
                                  reply.reason).observe(elapsed)
        log.info("admission: %s from %s (%s) pid %d: %s %s%s (%.1f ms)%s", request.user,
                 request.rhost or "?", request.ssh_connection or "no SSH_CONNECTION", peer.pid,
                 apb.AdmissionReply.Decision.Name(reply.decision), reply.reason,
                 f" job {reply.job_id}" if reply.job_id else "",
                 elapsed * 1000,
                 f": {reply.detail}" if reply.detail else "")
        return reply

    def _decide(self, request: apb.AdmissionRequest, peer: Peer) -> apb.AdmissionReply:
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
        if conn is None:
            detail = f"no usable SSH_CONNECTION ({request.ssh_connection!r})"
        else:
            budget = (request.options.timeout or DEFAULT_TIMEOUT) * 0.6
            deadline = max(0.05, min(self.rpc_timeout, budget))
            if self.warmer is not None:
                self.warmer.kick()  # overlap the kernel's migration toll with the call
            t_call = time.perf_counter()
            try:
                job_id = self.caller_id(conn.src_ip, conn, deadline)
            except grpc.RpcError as e:
                detail = (f"caller ID from {conn.src_ip} failed: {e.code().name}: "
                          f"{e.details()}")
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
    """The root-only Unix socket: one request line in, one reply line out, per connection."""

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
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="admission")
        self._thread = threading.Thread(target=self._accept_loop, name="admission-accept",
                                        daemon=True)
        self._closing = False

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing:
                    return
                log.exception("admission: accept failed")
                time.sleep(0.1)
                continue
            self._pool.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.io_timeout)
                peer = _peercred(conn)
                if peer.uid == 0 and self.admission.warmer is not None:
                    # Most requests end in an adoption: start the kernel's lock switch now
                    # (if the login watch has not already), while the request is read.
                    self.admission.warmer.kick()
                    self.admission.warmer.login_arrived()
                if peer.uid != 0:
                    security.warning("SECURITY: admission request from uid %d pid %d refused: "
                                     "only root may ask", peer.uid, peer.pid)
                    conn.sendall(_reply_line(apb.AdmissionReply(
                        decision=DENY, reason="not-root", message=MSG_BAD_REQUEST)))
                    return
                line = self._read_line(conn)
                if not line.strip():
                    # pam_adopt.py connects before it knows whether it will ask (root,
                    # another service): a connection closed without a request is normal.
                    log.debug("admission: pid %d closed without a request", peer.pid)
                    return
                request = apb.AdmissionRequest()
                try:
                    json_format.Parse(line, request)
                except Exception as e:  # ParseError, or TypeError for a non-object ("[]")
                    log.error("admission: malformed request from pid %d: %s", peer.pid, e)
                    conn.sendall(_reply_line(apb.AdmissionReply(
                        decision=DENY, reason="bad-request", message=MSG_BAD_REQUEST,
                        detail=str(e))))
                    return
                if not request.user:
                    log.error("admission: request from pid %d names no user", peer.pid)
                    conn.sendall(_reply_line(apb.AdmissionReply(
                        decision=DENY, reason="bad-request", message=MSG_BAD_REQUEST,
                        detail="no user")))
                    return
                conn.sendall(_reply_line(self.admission.decide(request, peer)))
            except (OSError, ValueError) as e:
                log.warning("admission: connection dropped: %s", e)
            except Exception:
                log.exception("admission: request failed")

    @staticmethod
    def _read_line(conn: socket.socket) -> bytes:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REQUEST:
                raise ValueError(f"request longer than {MAX_REQUEST} bytes")
        return buf.split(b"\n", 1)[0]

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
