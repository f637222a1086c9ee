"""A client of the node agent, used by the CLIs and by other agents.

Typed calls over a channel from node_agent.dial (targets, MUNGE both ways, keepalives).
Every call carries a fresh MUNGE credential bound to the method, the node meant and the
request, and every answer is checked for the agent's own credential (an impostor raises
ImpostorError); every call has a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import callerid
from node_agent import dial, shellwire
from node_agent.auth import Authenticator
from node_agent.pbconv import connection_to_pb
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc


class AgentClient:
    """Typed calls to one agent. Use as a context manager, or call close().

    `local_node` is this node's name as its agent knows it (the configuration's
    `node_name`): a credential for the local `unix:` socket names it; TCP targets name
    the address dialed."""

    def __init__(self, target: str, authenticator: Authenticator, timeout: float = 5.0, *,
                 local_node: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = dial.channel(target, authenticator, local_node)
        self.stub = agent_pb2_grpc.NodeAgentStub(self._channel)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    @staticmethod
    def connection(src_ip: str, src_port: int, dst_ip: str,
                   dst_port: int) -> callerid.Connection:
        """SSH_CONNECTION's four fields -> the connection to ask the client's node about
        (raises ValueError)."""
        return callerid.Connection.from_ssh_connection(
            callerid.Endpoint(callerid.normalize_ip(src_ip), src_port),
            callerid.Endpoint(callerid.normalize_ip(dst_ip), dst_port))

    def caller_id(self, conn: callerid.Connection, want_pid: bool = False,
                  timeout: float | None = None) -> pb.CallerIdReply:
        """Which job on the agent's node owns `conn` (as seen from that node: local = the
        ssh client's end)."""
        request = pb.CallerIdRequest(connection=connection_to_pb(conn), want_pid=want_pid)
        return self.stub.CallerId(request, timeout=timeout or self.timeout)

    def whois(self, conn: callerid.Connection,
              timeout: float | None = None) -> pb.CallerIdReply:
        """CallerId with every step of the agent's resolution."""
        request = pb.CallerIdRequest(connection=connection_to_pb(conn), want_pid=True)
        return self.stub.Whois(request, timeout=timeout or self.timeout)

    def list_jobs(self, user: str = "", job_id: str = "", with_pids: bool = False,
                  ) -> pb.ListJobsReply:
        """Jobs of the agent's node the caller may see (of `user`, or one job)."""
        return self.stub.ListJobs(
            pb.ListJobsRequest(user=user, job_id=job_id, with_pids=with_pids),
            timeout=self.timeout)

    def list_jobs_future(self, user: str = "", job_id: str = "", with_pids: bool = False,
                         ) -> Any:
        """ListJobs as a future (`result()`, `cancel()`): a search that has its answer
        cancels the calls it no longer needs this way (closing their channels instead, with
        calls in flight, can crash gRPC Python)."""
        return self.stub.ListJobs.future(
            pb.ListJobsRequest(user=user, job_id=job_id, with_pids=with_pids),
            timeout=self.timeout)

    def locate_job_future(self, job_id: str) -> Any:
        """LocateJob as a future: where a job of the caller's runs, as announced to this
        agent if it is one of the job's homes (node_agent/jobhome.py)."""
        return self.stub.LocateJob.future(pb.LocateJobRequest(job_id=job_id),
                                          timeout=self.timeout)

    def announce_jobs(self, node: str, jobs: Sequence[tuple[str, int]],
                      timeout: float | None = None) -> None:
        """Tell this agent, a home of `jobs` ((job id, uid), ...), that they run on
        `node` (root only: agents)."""
        self.stub.AnnounceJobs(
            pb.AnnounceJobsRequest(node=node, jobs=[pb.JobLocation(job_id=j, uid=u)
                                                    for j, u in jobs]),
            timeout=timeout or self.timeout)

    def start_job(self, job_id: str, user: str, argv: Sequence[str] = (), *, cwd: str = "",
                  env: Mapping[str, str] | None = None, output: str = "") -> pb.Job:
        """Start a job (root and admins)."""
        return self.stub.StartJob(
            pb.StartJobRequest(job_id=job_id, user=user, argv=list(argv), cwd=cwd,
                               env=dict(env or {}), output=output),
            timeout=self.timeout).job

    def attach(self, job_id: str, pid: int) -> pb.Job:
        """Move process `pid` into a job (root and admins)."""
        return self.stub.AttachToJob(pb.AttachToJobRequest(job_id=job_id, pid=pid),
                                     timeout=self.timeout).job

    def open_job_shell(self, frames: Iterator[pb.ShellFrame | bytes]) -> Any:
        """The OpenJobShell stream, with node_agent/shellwire.py's (de)serializers: data
        frames go out pre-encoded and come back as memoryviews. Returns the call: an
        iterator of frames that can also be cancelled."""
        method = self._channel.stream_stream(
            shellwire.METHOD, request_serializer=shellwire.serialize,
            response_deserializer=shellwire.parse)
        return method(frames)

    def end_job(self, job_id: str, timeout: float = 10.0) -> pb.EndJobReply:
        """End a job, waiting up to `timeout` seconds for its processes to die."""
        return self.stub.EndJob(pb.EndJobRequest(job_id=job_id, timeout=timeout),
                                timeout=max(self.timeout, timeout + 5))


class PeerPool:
    """Clients of other nodes' agents, one channel per peer, reused across calls
    (a new channel costs a connection handshake; logins should not pay it each time)."""

    def __init__(self, authenticator: Authenticator, port: int) -> None:
        self._auth = authenticator
        self._port = port
        self._clients: dict[str, AgentClient] = {}
        self._lock = threading.Lock()

    def client(self, host: str) -> AgentClient:
        """The client of `host`'s agent (made once, then reused)."""
        target = dial.grpc_target(host, self._port)
        with self._lock:
            c = self._clients.get(target)
            if c is None:
                c = self._clients[target] = AgentClient(target, self._auth)
            return c

    def caller_id(self, host: str, conn: callerid.Connection, deadline: float) -> str | None:
        """The job the agent on `host` says owns `conn`, or None (raises grpc.RpcError)."""
        reply = self.client(host).caller_id(conn, timeout=deadline)
        return reply.job_id if reply.outcome == pb.CallerIdReply.FOUND else None

    def announce_jobs(self, host: str, node: str, jobs: Sequence[tuple[str, int]],
                      timeout: float) -> None:
        """Tell the agent on `host` that `jobs` run on `node` (node_agent/agent/jobindex.py)."""
        self.client(host).announce_jobs(node, jobs, timeout=timeout)

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
