"""The NodeAgent gRPC servicer: thin over the callerid resolver and the job backend.

Authorization follows slurmd's caller-ID handler: root and the configured admin uids
may learn about any connection and manage jobs; anyone else learns only about
connections and jobs of their own. A question about somebody else's connection is
answered UNKNOWN, exactly as a connection that does not exist, and the agent logs a
security line. Domain errors become gRPC statuses in one place (`_serve`).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

import callerid
from callerid import Resolution, Resolver
from node_agent import shellwire
from node_agent.agent import metrics
from node_agent.agent.jobindex import JobIndex
from node_agent.agent.limits import (
    RefusalLog,
    SessionLimiter,
    SessionLimits,
    SessionSlot,
    TooManySessions,
)
from node_agent.agent.sessions import JobShellSessions
from node_agent.agent.sessions import Session as JobShellSession
from node_agent.auth import Identity, current_identity
from node_agent.errors import InvalidRequest, NotSupported, PermissionDenied, status_for
from node_agent.jobs.base import JobBackend, JobControl, JobRecord
from node_agent.pbconv import connection_from_pb
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc

log = logging.getLogger("node_agent.agent.service")
security = logging.getLogger("node_agent.security")

R = TypeVar("R")


def _serve(fn: Callable[..., R]) -> Callable[..., R]:
    """Turn the agent's exceptions into a status code and a public message."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return fn(self, request, context)
        except Exception as e:  # one catalog: node_agent.errors.status_for
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", fn.__name__)
            else:
                log.info("%s refused: %s", fn.__name__, message)
            context.abort(code, message)
            raise  # not reached: abort raises

    return wrapper


def job_to_pb(rec: JobRecord, jobs: JobBackend, with_pids: bool = False) -> pb.Job:
    """A job as the API shows it (its pids only when asked: reading them costs)."""
    j = rec.job
    return pb.Job(
        id=j.id, user=j.user, uid=j.uid, gid=j.gid, start_time=j.start_time,
        main_pid=j.main_pid or 0, state=rec.state, node=jobs.node,
        cgroups=jobs.cgroup_names(j.id),
        pids=jobs.pids(j.id) if with_pids else [],
    )


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    """The NodeAgent service: caller ID, jobs and ssh-to-job streams, over a job backend."""
    def __init__(self, *, node: str, resolver: Resolver, jobs: JobBackend,
                 admin_uids: tuple[int, ...] = (),
                 shells: JobShellSessions | None = None,
                 limits: SessionLimits | None = None,
                 index: JobIndex | None = None) -> None:
        self.node = node
        self.index = index
        self.shells = shells
        self.resolver = resolver
        self.jobs = jobs
        self.admin_uids = frozenset((0, *admin_uids))
        # ssh-to-job's caps (node_agent/agent/limits.py); create_server sizes the sessions'
        # own thread pool from them.
        self.limits = limits or SessionLimits()
        self.sessions = SessionLimiter(self.limits, node)
        self._refusals = RefusalLog(log)

    def _control(self) -> JobControl:
        """The backend, when it starts and ends jobs on request (the native registry)."""
        if not isinstance(self.jobs, JobControl):
            raise NotSupported(f"jobs on {self.node} are started and ended by the "
                                     "scheduler, not by the agent")
        return self.jobs

    def _privileged(self, ident: Identity) -> bool:
        return ident.uid in self.admin_uids

    def _require_admin(self, ident: Identity, what: str) -> None:
        if not self._privileged(ident):
            security.warning("SECURITY: uid %d tried to %s on %s: refused", ident.uid, what,
                             self.node)
            raise PermissionDenied(f"only root and admin uids may {what}")

    # -- caller ID -----------------------------------------------------------------------
    def _answer(self, request: pb.CallerIdRequest, explain: bool) -> pb.CallerIdReply:
        ident = current_identity()
        conn = connection_from_pb(request.connection)
        t0 = time.perf_counter()
        res: Resolution = self.resolver.resolve(conn, want_pid=explain or request.want_pid)
        rec = self.jobs.get(res.job_id) if res.job_id else None
        metrics.RESOLVE_SECONDS.observe(time.perf_counter() - t0)
        owner_uid = rec.job.uid if rec else res.uid
        if not self._privileged(ident) and owner_uid != ident.uid:
            # Not yours, or no such connection: one and the same answer (no pid, no
            # steps), so that a user cannot tell someone else's connection from a
            # missing one; a question about someone else's is recorded.
            if owner_uid is not None:
                security.warning(
                    "SECURITY: uid %d asked %s about %s -> %s, owned by uid %d%s: answered "
                    "unknown", ident.uid, self.node, conn.local, conn.remote, owner_uid,
                    f" (job {rec.job.id})" if rec else "")
                metrics.ANSWERS.labels("denied").inc()
            else:
                metrics.ANSWERS.labels("unknown").inc()
            return pb.CallerIdReply(outcome=pb.CallerIdReply.UNKNOWN, node=self.node,
                                    method=callerid.METHOD_NOT_FOUND)
        reply = pb.CallerIdReply(node=self.node, method=res.method, pid=res.pid or 0,
                                 uid=res.uid if res.uid is not None else 0)
        if rec is not None:
            reply.outcome = pb.CallerIdReply.FOUND
            reply.job_id = rec.job.id
            reply.user = rec.job.user
            reply.uid = rec.job.uid
            metrics.ANSWERS.labels("found").inc()
        else:
            reply.outcome = pb.CallerIdReply.UNKNOWN
            metrics.ANSWERS.labels("unknown").inc()
        if explain:
            reply.steps.extend(pb.Step(name=s.name, detail=s.detail, micros=s.micros)
                               for s in res.steps)
        log.debug("caller-id for uid %d: %s -> %s: %s job %s pid %s (%s)", ident.uid,
                  conn.local, conn.remote, pb.CallerIdReply.Outcome.Name(reply.outcome),
                  reply.job_id or "-", reply.pid or "-", res.method)
        return reply

    @_serve
    def CallerId(self, request: pb.CallerIdRequest,
                 context: grpc.ServicerContext) -> pb.CallerIdReply:
        """Which job owns a connection whose local end is on this node."""
        return self._answer(request, explain=False)

    @_serve
    def Whois(self, request: pb.CallerIdRequest,
              context: grpc.ServicerContext) -> pb.CallerIdReply:
        """CallerId with every step of the resolution, for `adoptctl whois`."""
        return self._answer(request, explain=True)

    # -- jobs ----------------------------------------------------------------------------
    @_serve
    def ListJobs(self, request: pb.ListJobsRequest,
                 context: grpc.ServicerContext) -> pb.ListJobsReply:
        """The jobs of this node the caller may see (root and admins: all)."""
        ident = current_identity()
        recs = self.jobs.list_jobs(request.user or None)
        if request.job_id:
            recs = [r for r in recs if r.job.id == request.job_id]
        if not self._privileged(ident):
            recs = [r for r in recs if r.job.uid == ident.uid]
        return pb.ListJobsReply(
            node=self.node, jobs=[job_to_pb(r, self.jobs, request.with_pids) for r in recs])

    # -- the job index (node_agent/agent/jobindex.py) ----------------------------------------
    @_serve
    def AnnounceJobs(self, request: pb.AnnounceJobsRequest,
                     context: grpc.ServicerContext) -> pb.AnnounceJobsReply:
        """Another agent's running jobs of which this node is a home (root only)."""
        ident = current_identity()
        if ident.uid != 0:
            security.warning("SECURITY: uid %d tried to announce jobs of %s to %s: refused",
                             ident.uid, request.node or "?", self.node)
            raise PermissionDenied("only agents (root) announce jobs")
        if self.index is None:
            raise NotSupported(f"{self.node} keeps no job index (no `nodes`, or a "
                               "scheduler's backend)")
        self.index.replace(request.node, [(j.job_id, j.uid) for j in request.jobs])
        return pb.AnnounceJobsReply()

    @_serve
    def LocateJob(self, request: pb.LocateJobRequest,
                  context: grpc.ServicerContext) -> pb.LocateJobReply:
        """Where a job of the caller's runs, as announced to this home."""
        ident = current_identity()
        callerid.validate_job_id(request.job_id)
        if self.index is None:
            raise NotSupported(f"{self.node} keeps no job index (no `nodes`, or a "
                               "scheduler's backend)")
        uid = None if self._privileged(ident) else ident.uid
        return pb.LocateJobReply(nodes=self.index.locate(request.job_id, uid))

    @_serve
    def StartJob(self, request: pb.StartJobRequest,
                 context: grpc.ServicerContext) -> pb.StartJobReply:
        """Start a job (root and admins; backends that start jobs themselves)."""
        self._require_admin(current_identity(), "start jobs")
        if not request.user:
            raise InvalidRequest("a job needs a user")
        rec = self._control().start(request.job_id, request.user, list(request.argv),
                                  cwd=request.cwd, env=dict(request.env), output=request.output)
        return pb.StartJobReply(job=job_to_pb(rec, self.jobs, with_pids=True))

    @_serve
    def AttachToJob(self, request: pb.AttachToJobRequest,
                    context: grpc.ServicerContext) -> pb.AttachToJobReply:
        """Move a process into a job (root and admins; backends that control jobs)."""
        self._require_admin(current_identity(), "attach processes to jobs")
        callerid.validate_job_id(request.job_id)
        rec = self._control().attach(request.job_id, request.pid)
        return pb.AttachToJobReply(job=job_to_pb(rec, self.jobs, with_pids=True))

    def OpenJobShell(  # type: ignore[override]  # shellwire frames, not only ShellFrame
            self, request_iterator: Iterator[shellwire.Frame],
            context: grpc.ServicerContext) -> Iterator[pb.ShellFrame | bytes]:
        """ssh-to-job: the first frame opens a session (node_agent/agent/sessions.py); then the
        ssh byte stream flows both ways until sshd exits or the client goes away. Frames
        are (de)serialized by node_agent/shellwire.py (see server.create_server).

        The stream counts toward the session caps from here on, before its first frame
        (node_agent/agent/limits.py); the first frame must come within the open timeout."""
        ident = current_identity()
        if self.shells is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"ssh-to-job is not enabled on {self.node}")
        slot = self._take_slot(ident, context)
        # The end of the call frees the slot, however it ends (refused below, the client
        # gone); a session's relay frees it earlier, once the session is cleaned up.
        # release() is idempotent.
        context.add_callback(slot.release)
        first = self._first_frame(request_iterator, context, ident)
        if isinstance(first, memoryview) or first.WhichOneof("kind") != "open":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be `open`")
        req = first.open
        try:
            if req.remove_on_interrupt:
                self._can_remove(req.job_id)   # before anything starts
            session = self.shells.open(req.job_id, ident.uid, self._privileged(ident),
                                       req.public_key, list(req.shells))
        except Exception as e:
            # (someone else's job is JobNotFound, logged by JobShellSessions.open)
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("OpenJobShell failed")
            context.abort(code, message)
        log.info("ssh-to-job: uid %d opened session %s in job %s as %s (%s)", ident.uid,
                 session.session_id, req.job_id, session.user, req.client or "?")
        # Ctrl-C on the client, or a broken connection, cancels the call: end the session.
        # grpc runs this callback in the server's one polling thread, which every call of
        # every method needs to be dispatched at all; killing a session's cgroup can take
        # seconds (up to the kill's timeout), so it runs in a thread of its own.
        context.add_callback(lambda: threading.Thread(
            target=session.kill, name=f"shell-kill-{session.session_id}").start())
        removal = _Removal(self, ident.uid, req.job_id) if req.remove_on_interrupt else None
        return self._relay(session, request_iterator, slot, removal)

    def _can_remove(self, job_id: str) -> None:
        """-remove-on-interrupt is for backends that end jobs: NotSupported elsewhere, so
        that the client says so before the session opens, not when Ctrl-C is pressed.
        (Whose job it is, open() decides next: only its owner, root or an admin uid gets
        the session, and with it the right to end the job, as condor_rm allows.)"""
        if not isinstance(self.jobs, JobControl):
            raise NotSupported(
                f"-remove-on-interrupt: jobs on {self.node} are ended by their scheduler, "
                f"not by the agent (end job {job_id} with the scheduler, e.g. scancel)")

    def _take_slot(self, ident: Identity, context: grpc.ServicerContext) -> SessionSlot:
        """A slot under the session caps for this stream, or RESOURCE_EXHAUSTED."""
        try:
            return self.sessions.acquire(ident.uid, exempt=self._privileged(ident))
        except TooManySessions as e:
            self._refusals.refused(ident.uid, "cap", f"ssh-to-job: refused: {e}")
            context.abort(e.code, str(e))
            raise  # not reached: abort raises

    def _first_frame(self, request_iterator: Iterator[shellwire.Frame],
                     context: grpc.ServicerContext, ident: Identity) -> Any:
        """The stream's first frame, or the call ended: DEADLINE_EXCEEDED when none came
        within the open timeout, INVALID_ARGUMENT for an empty stream.

        grpc's request iterator has no timeout, so a helper thread waits for the frame;
        once this handler ends the call, grpc ends the iterator and the helper with it."""
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def read() -> None:
            try:
                box.put(next(request_iterator))
            except BaseException as e:  # StopIteration, or the call ended (RpcError)
                box.put(e)

        threading.Thread(target=read, name="shell-open", daemon=True).start()
        timeout = self.limits.open_timeout
        try:
            first = box.get(timeout=timeout)
        except queue.Empty:
            self._refusals.refused(
                ident.uid, "open-timeout",
                f"ssh-to-job: uid {ident.uid} sent no `open` frame within {timeout:g} s: "
                f"stream ended")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no `open` frame within {timeout:g} s")
        if isinstance(first, StopIteration):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send `open` first")
        if isinstance(first, BaseException):
            raise first  # the client went away: grpc knows, nothing to answer
        return first

    def _relay(self, session: JobShellSession, request_iterator: Iterator[shellwire.Frame],
               slot: SessionSlot, removal: _Removal | None = None,
               ) -> Iterator[pb.ShellFrame | bytes]:
        counts = [0, 0, 0, 0]  # frames and bytes in, frames and bytes out

        def pump_in() -> None:
            try:
                for frame in request_iterator:
                    if removal is not None and removal.asked(frame):
                        removal.remove(session.session_id)
                        break
                    data, eof = shellwire.unpack(frame)
                    if data:
                        counts[0] += 1
                        counts[1] += len(data)
                        session.write(data)
                    if eof:
                        if removal is None:
                            break
                        # -remove-on-interrupt: the client's last word may still come
                        try:
                            session.close_stdin()
                        except OSError:
                            pass
            except Exception:  # the call ended (cancelled, or sshd went away)
                pass
            finally:
                try:
                    session.close_stdin()
                except OSError:
                    pass

        pump = threading.Thread(target=pump_in, name=f"shell-in-{session.session_id}",
                                daemon=True)
        pump.start()
        try:
            yield pb.ShellFrame(opened=pb.ShellOpened(
                host_key=session.host_key, node=self.node, user=session.user,
                session_id=session.session_id, remove_on_interrupt=removal is not None))
            for parts in session:
                counts[2] += 1
                counts[3] += sum(len(p) for p in parts)
                yield shellwire.data_frame(parts)
            if removal is not None:
                # The session is over; the client ends its side now, or says `remove`
                # (it was interrupted). Bounded: a client that says nothing is let go.
                pump.join(REMOVE_WAIT)
                if removal.answer is not None:
                    yield pb.ShellFrame(removed=removal.answer)
            yield pb.ShellFrame(eof=True)
        finally:
            try:
                session.cleanup()
            finally:
                slot.release()  # after the clean-up: until then this thread is the session's
            log.info("ssh-to-job: session %s ended (in: %d bytes in %d frames, out: %d bytes "
                     "in %d frames)", session.session_id, counts[1], counts[0], counts[3],
                     counts[2])

    @_serve
    def EndJob(self, request: pb.EndJobRequest,
               context: grpc.ServicerContext) -> pb.EndJobReply:
        """End a job: kill its processes and forget it (root and admins)."""
        self._require_admin(current_identity(), "end jobs")
        callerid.validate_job_id(request.job_id)
        rec, killed = self._control().end(request.job_id, timeout=request.timeout or 10.0)
        return pb.EndJobReply(job=job_to_pb(rec, self.jobs), killed=killed)


# How long a -remove-on-interrupt session's stream waits, once its sshd is gone, for the
# client's last word (`remove`, or the end of its requests), ending the job included.
REMOVE_WAIT = 15.0


class _Removal:
    """-remove-on-interrupt for one session: the job is ended, once, when the client that
    opened the session (its owner, root or an admin uid: JobShellSessions.open checked)
    sends `remove`. EndJob stays root's and the admins'; this is the session's own right,
    asked for at open and granted in `opened`, on the caller's authenticated stream."""

    def __init__(self, servicer: NodeAgentServicer, uid: int, job_id: str) -> None:
        self.servicer, self.uid, self.job_id = servicer, uid, job_id
        self.answer: pb.ShellRemoved | None = None

    @staticmethod
    def asked(frame: shellwire.Frame) -> bool:
        return not isinstance(frame, memoryview) and frame.WhichOneof("kind") == "remove"

    def remove(self, session_id: str) -> None:
        """End the job (its sessions, this one included, end with it); `answer` says how
        it went."""
        try:
            _rec, killed = self.servicer._control().end(self.job_id, timeout=10.0)
        except Exception as e:   # one catalog, as for any call
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("ssh-to-job: ending job %s failed", self.job_id)
            log.warning("ssh-to-job: session %s: uid %d asked to end job %s "
                        "(-remove-on-interrupt): %s", session_id, self.uid, self.job_id,
                        message)
            self.answer = pb.ShellRemoved(error=message)
            return
        log.info("ssh-to-job: session %s: uid %d ended job %s (-remove-on-interrupt): "
                 "%d processes killed", session_id, self.uid, self.job_id, killed)
        self.answer = pb.ShellRemoved(killed=killed)
