"""The agent's error catalog: each domain error maps to one gRPC status and a public message.

Servicers raise these; `node_agent.agent.service` turns them into `context.abort(code, message)`
in one place. The CLIs map the status codes back to a category and exit code
(`node_agent.cli.adoptctl`). Errors from the `callerid` library are mapped here too.
"""

from __future__ import annotations

import grpc

import callerid


class StartupError(RuntimeError):
    """The agent cannot start; the message says why and what to do."""


class AgentError(Exception):
    """Base of the agent's errors; `code` is the gRPC status the client sees."""

    code = grpc.StatusCode.INTERNAL


class AuthError(AgentError):
    """A credential could not be made or verified (or munged is unreachable)."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, *, unavailable: bool = False,
                 replayed: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.replayed = replayed


class ImpostorError(AuthError):
    """Client side: whatever answered is not the agent meant (no proof that root on
    that node made the answer): its answer is ignored."""


class InvalidRequest(AgentError):
    """A request that makes no sense (a bad connection, job id or key)."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDenied(AgentError):
    """Something only root and admins may do."""
    code = grpc.StatusCode.PERMISSION_DENIED


class JobNotFound(AgentError):
    """No such job here, or not the caller's (the two are answered alike)."""
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, job_id: str, node: str) -> None:
        super().__init__(f"no job {job_id} on {node}")


class JobExists(AgentError):
    """A job with this id already runs here."""
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, job_id: str, node: str) -> None:
        super().__init__(f"job {job_id} already exists on {node}")


class JobNotRunning(AgentError):
    """The job exists but is not running (starting, or ending): nothing joins it."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, job_id: str, node: str, state: str) -> None:
        super().__init__(f"job {job_id} on {node} is {state}, not running")


class NotSupported(AgentError):
    """The job backend does not do this (a scheduler's jobs are started by the scheduler)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class JobStartFailed(AgentError):
    """A job's main command, or a session's sshd, could not be started."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class RegistryFailure(AgentError):
    """The job registry could not do what was asked, and says what happens next: its
    state dir cannot record a new job (full, read-only), or a job's processes would not
    die yet (the agent keeps trying). Not INTERNAL: the cause is the node, not a bug."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and public message for an exception raised while serving."""
    if isinstance(exc, AgentError):
        return exc.code, str(exc)
    # (callerid.InvalidJobId is a ValueError: INVALID_ARGUMENT below)
    if isinstance(exc, callerid.CgroupError):
        return grpc.StatusCode.INTERNAL, f"cgroup operation failed: {exc}"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the agent's log)"
