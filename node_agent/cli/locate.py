"""Finding a job's node: the one code path of every CLI (issue 12, "find the job from anywhere").

`ssh-to-job JOB` and `adoptctl jobs --all` run on any node, a login node with no agent too:
they need only the configuration and MUNGE. Where the job is, in this order:

1. a job reference that names its node, ``42@node17`` (printed by `adoptctl`), or
   `-name NODE`: that node's agent is asked directly, no search;
2. ``backend = "slurm"``: slurmctld is asked once (one ``squeue`` call,
   node_agent/jobs/slurmctl.py) for the job's BatchHost, whose agent is then asked;
3. the native registry with a `nodes` key: first the job's two homes (node_agent/jobhome.py;
   the agents announce their running jobs to them, node_agent/agent/jobindex.py) are
   asked ``LocateJob`` within HOME_TIMEOUT (the second only when the first has not
   answered within HOME_HEDGE, or does not know the job), and the node named is
   asked ``ListJobs(job_id)`` (a home's answer is a hint: only the job's own agent is
   believed). Two calls, however many nodes there are (with no more than two
   nodes, the homes are not asked: the fan-out asks the same agents). When that finds nothing
   running (a job started less than a second ago, a home restarted or down), a bounded
   parallel fan-out of ``ListJobs(job_id)`` to every node's agent (`fan_out`): at most
   ``locate_parallel`` calls in flight, taken in the NodeSet's order, each with the
   deadline ``locate_timeout``; the first agent that has the job *running* wins and the
   calls still in flight are cancelled, the nodes not yet asked are not asked. Nodes that
   did not answer are named (`-debug`, and the error when the job is nowhere);
4. no `nodes`: this node's own agent (its Unix socket), as before issue 12.

A job of another user is never found: each agent answers ListJobs with the caller's own jobs
only (root and admin_uids: everyone's; node_agent/agent/service.py), so it looks like a
missing one, as slurmd's rule wants.

Job references: ``JOB@NODE``. Job ids never contain '@' (callerid.validate_job_id allows
``[A-Za-z0-9_.+-]``), so the split is unambiguous; `parse_ref` is the one parser. The
ssh-style ``user@JOB`` of earlier versions is gone (the login is always the job's user,
so the name was ignored; rsync and scp pass a user as ``-l USER`` anyway).

Worst case of one round (every node black-holed): HOME_TIMEOUT + ceil(len(nodes) /
locate_parallel) x locate_timeout. A dead node that refuses connections costs
milliseconds, a black-holed one `locate_timeout` of one slot.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TextIO, TypeVar

import grpc

from node_agent import config as config_mod
from node_agent import dial, jobhome
from node_agent.auth import Authenticator
from node_agent.cli.common import CATEGORIES, CliError, UsageError
from node_agent.client import AgentClient
from node_agent.errors import AuthError, ImpostorError
from node_agent.jobs import slurmctl
from node_agent.proto.v1 import agent_pb2 as pb

#: Between two rounds of -auto-retry (one agent asked, or one fan-out).
RETRY_INTERVAL = 2.0
#: The deadline of a direct call (-name, JOB@NODE, the BatchHost, the local agent).
DIRECT_TIMEOUT = 10.0
#: The deadline of the questions to a job's homes (at most locate_timeout): a home answers
#: from memory, so a slower one is treated as down and the fan-out goes ahead.
HOME_TIMEOUT = 0.5
#: The second home is asked when the first has not said where the job is within this
#: long (a home answers in milliseconds; one that is down or black-holed costs this).
HOME_HEDGE = 0.1

# A node in a job reference: a host name or an address (IPv6 in brackets); no port, no
# '/', ':' or blanks (the reference is also rsync's and scp's host).
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\]")


# -- job references -----------------------------------------------------------------------

@dataclass(frozen=True)
class JobRef:
    """A job id, and the node it runs on when the reference names one (``42@node17``)."""
    job_id: str
    node: str | None = None

    def __str__(self) -> str:
        return format_ref(self.job_id, self.node)


def format_ref(job_id: str, node: str | None) -> str:
    """``42``, ``node17`` -> ``42@node17``; the job id alone without a node."""
    return f"{job_id}@{node}" if node else job_id


def parse_ref(text: str) -> JobRef:
    """``42`` -> JobRef('42'); ``42@node17`` -> JobRef('42', 'node17'); UsageError else.

    >>> parse_ref("42@node17")
    JobRef(job_id='42', node='node17')
    """
    job_id, at, node = text.partition("@")
    if not job_id:
        raise UsageError(f"empty job id in {text!r}")
    if not at:
        return JobRef(job_id)
    if _NODE.fullmatch(node) is None:
        raise UsageError(f"bad node in job reference {text!r} (expected JOB@NODE, "
                         "e.g. 42@node17)")
    return JobRef(job_id, node)


# -- the fan-out --------------------------------------------------------------------------

Reply = TypeVar("Reply")
Reply_co = TypeVar("Reply_co", covariant=True)


class Call(Protocol[Reply_co]):
    """A call in flight (a gRPC future)."""

    def result(self, timeout: float | None = None) -> Reply_co:
        """Its answer (raises its error; grpc.FutureCancelledError once cancelled)."""
        ...

    def cancel(self) -> bool:
        """End it now."""
        ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call `fn` (in another thread) once it has ended."""
        ...


class JobLister(Protocol):
    """What the fan-out needs of a client (node_agent.client.AgentClient)."""

    def list_jobs(self, user: str = "", job_id: str = "", with_pids: bool = False,
                  ) -> pb.ListJobsReply:
        """The agent's ListJobs."""
        ...

    def list_jobs_future(self, user: str = "", job_id: str = "", with_pids: bool = False,
                         ) -> Call[pb.ListJobsReply]:
        """The agent's ListJobs, as a call that can be cancelled."""
        ...

    def locate_job_future(self, job_id: str) -> Call[pb.LocateJobReply]:
        """The agent's LocateJob (a pb.LocateJobReply), as a call that can be cancelled."""
        ...

    def close(self) -> None:
        """Close the channel (once no call is in flight on it)."""
        ...


@dataclass
class FanOut(Generic[Reply]):
    """What one fan-out round learnt: the replies by node, the nodes that did not answer
    (node -> why), the nodes not asked because the search ended early, and the winner."""
    replies: dict[str, Reply] = field(default_factory=dict)
    unanswered: dict[str, str] = field(default_factory=dict)
    not_asked: list[str] = field(default_factory=list)
    winner: str | None = None
    auth_error: AuthError | None = None
    last_error: BaseException | None = None
    seconds: float = 0.0


def _why(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        code = e.code()
        return CATEGORIES.get(code, code.name if code else "Error")
    if isinstance(e, ImpostorError):
        return "not the agent (impostor)"
    if isinstance(e, AuthError):
        return f"MUNGE: {e}"
    return str(e)  # ValueError: a name that does not resolve


def fan_out(nodes: Sequence[str], open_client: Callable[[str], JobLister],
            request: Callable[[JobLister], Call[Reply]], *, parallel: int,
            enough: Callable[[str, Reply], bool] = lambda node, reply: False,
            stagger: float = 0.0) -> FanOut[Reply]:
    """Ask every node's agent (the call `request` starts on `open_client(node)`), at most
    `parallel` at once, in the order of `nodes`; stop as soon as `enough(node, reply)`
    says so: the calls in flight are cancelled, the rest are not made. Each call's
    deadline is the client's. Returns when every started call has ended. With `stagger`,
    the next call starts only once the last one started has gone `stagger` seconds
    without an answer, or when no call is in flight (a hedged request: the second of a
    job's homes is asked only when the first is slow or does not know).

    One thread starts every call (as a gRPC future) and handles every answer; the calls'
    done-callbacks only queue them (no thread per node: what a search costs is gRPC's work
    per new connection, about 1 ms of the client's CPU per node in the lab,
    tests/benchmarks/bench_locate.py). Calls are cancelled, never their
    channels closed under them: gRPC Python may crash when a channel is closed while a
    call on it is in flight (grpc/grpc#16290, #19235); a client is closed once its call
    has ended."""
    result: FanOut[Reply] = FanOut()
    start = time.monotonic()
    todo = deque(nodes)
    inflight: dict[str, tuple[JobLister, Call[Reply]]] = {}
    finished: deque[str] = deque()
    cond = threading.Condition()
    stop = False

    def on_done(node: str) -> Callable[[Any], None]:
        def done(_: Any) -> None:  # in a gRPC thread: only queue it
            with cond:
                finished.append(node)
                cond.notify()
        return done

    def fail(node: str, error: BaseException) -> None:
        result.unanswered[node] = _why(error)
        result.last_error = error
        if isinstance(error, AuthError) and result.auth_error is None:
            result.auth_error = error

    last_start = 0.0

    def may_start() -> bool:
        return (not stop and bool(todo) and len(inflight) < max(1, parallel)
                and (not stagger or not inflight
                     or time.monotonic() - last_start >= stagger))

    while True:
        while may_start():
            node = todo.popleft()
            last_start = time.monotonic()
            try:
                client = open_client(node)
            except (ValueError, OSError) as e:  # cannot resolve the name
                result.unanswered[node] = _why(e)
                continue
            try:
                call = request(client)  # (makes the MUNGE credential: may raise)
            except (grpc.RpcError, ImpostorError, AuthError) as e:
                client.close()
                fail(node, e)
                continue
            inflight[node] = (client, call)
            call.add_done_callback(on_done(node))
        if not inflight:
            break
        with cond:
            while not finished:
                if stagger and not stop and todo and len(inflight) < max(1, parallel):
                    left = stagger - (time.monotonic() - last_start)
                    if left <= 0:
                        break   # time to start the next one
                    cond.wait(left)
                else:
                    cond.wait()
            if not finished:
                continue
            node = finished.popleft()
        client, call = inflight.pop(node)
        reply: Reply | None = None
        try:
            reply = call.result()
        except grpc.FutureCancelledError:
            pass  # we cancelled it: the search is over
        except (grpc.RpcError, ImpostorError, AuthError) as e:
            if not (stop and isinstance(e, grpc.RpcError)
                    and e.code() == grpc.StatusCode.CANCELLED):
                fail(node, e)
        finally:
            client.close()
        if reply is not None:
            result.replies[node] = reply
            if not stop and enough(node, reply):
                result.winner, stop = node, True
                for _, other in inflight.values():
                    other.cancel()
    result.not_asked = list(todo)
    result.seconds = time.monotonic() - start
    return result


def describe_unanswered(unanswered: dict[str, str]) -> str:
    """``node[3,7] (Timeout), node9 (Agent unreachable)``: the nodes folded by reason."""
    by_why: dict[str, list[str]] = {}
    for node, why in unanswered.items():
        by_why.setdefault(why, []).append(node)
    return ", ".join(f"{config_mod.fold_nodes(sorted(n))} ({why})"
                     for why, n in sorted(by_why.items(), key=lambda kv: kv[1][0]))


def slurm_batch_host(job_id: str, auto_retry: bool,
                     query: Callable[[str], slurmctl.SlurmJobInfo] = slurmctl.query_job) -> str:
    """The BatchHost of Slurm job `job_id` (the first node of an salloc allocation), from
    one squeue call; CliError when Slurm does not know it or it does not run."""
    try:
        info = query(job_id)
    except slurmctl.SlurmJobUnknown:
        raise CliError("Not found", f"no job {job_id} in Slurm") from None
    except slurmctl.SlurmQueryError as e:
        raise CliError("Slurm", str(e)) from None
    if not info.running or not info.batch_host:
        hint = ("; -auto-retry waits for a Slurm job once it runs on its nodes (slurmctld "
                "is not polled)") if auto_retry and not info.nodes else ""
        raise CliError("Not running", f"job {job_id} is {info.state} in Slurm{hint}")
    return info.batch_host


# -- locating one job ---------------------------------------------------------------------

@dataclass(frozen=True)
class Located:
    """Where a job was found: the agent's target, the job, its node."""
    target: str
    job: pb.Job
    node: str

    @property
    def ref(self) -> str:
        """The job's reference that skips the search next time (``42@node17``)."""
        return format_ref(self.job.id, self.node)


@dataclass
class _Round:
    running: Located | None = None
    other: Located | None = None       # a match that is not running (ending, ...)
    where: str = ""                    # what was asked, for "no job X on WHERE"
    unanswered: dict[str, str] = field(default_factory=dict)


class Locator:
    """Finds a job for a CLI from its configuration (see the module's docstring).

    `open_client(target, timeout)` makes a client (tests pass fakes); `query_slurm` is
    node_agent.jobs.slurmctl.query_job."""

    def __init__(self, cfg: config_mod.AgentConfig, auth: Authenticator, err: TextIO, *,
                 debug: bool = False, prog: str = "ssh-to-job",
                 sleep: Callable[[float], None] = time.sleep,
                 open_client: Callable[[str, float], JobLister] | None = None,
                 query_slurm: Callable[[str], slurmctl.SlurmJobInfo] = slurmctl.query_job,
                 target_of: Callable[[str | None], str] | None = None,
                 ) -> None:
        self.cfg, self.auth, self.err, self.debug, self.prog = cfg, auth, err, debug, prog
        self.sleep = sleep
        self.query_slurm = query_slurm
        self._open = open_client or self._agent_client
        if target_of is not None:
            self._target = target_of  # type: ignore[method-assign, assignment]

    def _target(self, node: str | None) -> str:
        """The gRPC target of `node`'s agent (this node's own for None): node_agent.dial."""
        return dial.agent_target(self.cfg, node)

    def _agent_client(self, target: str, timeout: float) -> JobLister:
        return AgentClient(target, self.auth, timeout=timeout, local_node=self.cfg.node_name)

    def _say(self, text: str) -> None:
        if self.debug:
            self.err.write(f"{self.prog}: {text}\n")

    # The search, one round ----------------------------------------------------------------

    def _match(self, target: str, reply: pb.ListJobsReply, job_id: str) -> Located | None:
        for j in reply.jobs:
            if j.id == job_id:
                return Located(target, j, j.node or reply.node)
        return None

    def _direct(self, node: str | None, job_id: str, timeout: float = DIRECT_TIMEOUT,
                ) -> _Round:
        """One agent: `node`'s, or this node's own (node None). Its errors are raised."""
        target = self._target(node)
        client = self._open(target, timeout)
        try:
            reply = client.list_jobs(job_id=job_id)
        finally:
            client.close()
        found = self._match(target, reply, job_id)
        where = node or reply.node or target
        if found is not None and found.job.state == "running":
            return _Round(running=found, where=where)
        return _Round(other=found, where=where)

    def _from_homes(self, job_id: str, nodes: Sequence[str]) -> _Round | None:
        """The job, found through its homes (LocateJob) and confirmed by the node they
        name (ListJobs); None when that does not find it running."""
        homes = jobhome.homes(job_id, nodes)
        timeout = min(HOME_TIMEOUT, self.cfg.locate_timeout)
        out = fan_out(homes, lambda node: self._open(self._target(node), timeout),
                      lambda c: c.locate_job_future(job_id), parallel=len(homes),
                      enough=lambda node, reply: bool(reply.nodes), stagger=HOME_HEDGE)
        named: list[str] = []
        for home in ([out.winner] if out.winner else []) + homes:
            reply = out.replies.get(home)
            for node in reply.nodes if reply is not None else ():
                if node not in named and node in nodes:
                    named.append(node)
        for node in named[:jobhome.HOMES]:
            self._say(f"job {job_id}'s home {out.winner} says it runs on {node}")
            try:
                rnd = self._direct(node, job_id, self.cfg.locate_timeout)
            except (grpc.RpcError, ImpostorError, AuthError, ValueError) as e:
                self._say(f"{node} did not answer ({_why(e)})")
                continue
            if rnd.running is not None:
                return rnd
        if not named:
            why = f" ({describe_unanswered(out.unanswered)})" if out.unanswered else ""
            self._say(f"job {job_id}'s homes ({', '.join(homes)}) do not know it{why}: "
                      "asking every node")
        else:
            self._say(f"job {job_id} does not run on {', '.join(named[:jobhome.HOMES])} "
                      "after all: asking every node")
        return None

    def _fan_out(self, job_id: str) -> _Round:
        nodes = self.cfg.node_names()
        # (With no more nodes than a job has homes, the fan-out asks the same agents.)
        found = self._from_homes(job_id, nodes) if len(nodes) > jobhome.HOMES else None
        if found is not None:
            return found
        timeout = self.cfg.locate_timeout

        def open_client(node: str) -> JobLister:
            return self._open(self._target(node), timeout)

        def running(node: str, reply: pb.ListJobsReply) -> bool:
            return any(j.id == job_id and j.state == "running" for j in reply.jobs)

        out = fan_out(nodes, open_client, lambda c: c.list_jobs_future(job_id=job_id),
                      parallel=self.cfg.locate_parallel, enough=running)
        self._say(f"{len(out.replies)} of {len(nodes)} nodes answered "
                  f"({self.cfg.locate_parallel} at a time, within {timeout:g} s each) in "
                  f"{out.seconds * 1000:.0f} ms"
                  + (f": job {job_id} runs on {out.winner}" if out.winner else ""))
        if out.unanswered:
            self._say(f"no answer from {describe_unanswered(out.unanswered)}")
        if not out.replies:
            if out.auth_error is not None:
                raise out.auth_error
            raise CliError("Agent unreachable",
                           f"no agent answered: {describe_unanswered(out.unanswered)}")
        rnd = _Round(where=self.cfg.nodes, unanswered=out.unanswered)
        if out.winner is not None:
            rnd.running = self._match(self._target(out.winner),
                                      out.replies[out.winner], job_id)
            return rnd
        for node in nodes:  # in order: the first node that knows it, not running
            if node in out.replies:
                rnd.other = rnd.other or self._match(self._target(node),
                                                     out.replies[node], job_id)
        return rnd

    def _targets(self, targets: Sequence[str], job_id: str, timeout: float) -> _Round:
        """Each of `targets` in turn (no parallelism): the first that has the job running
        wins. When none answers, the last error is raised."""

        def running(target: str, reply: pb.ListJobsReply) -> bool:
            return any(j.id == job_id and j.state == "running" for j in reply.jobs)

        out = fan_out(targets, lambda t: self._open(t, timeout),
                      lambda c: c.list_jobs_future(job_id=job_id), parallel=1, enough=running)
        if not out.replies and out.last_error is not None:
            raise out.last_error
        rnd = _Round(where=", ".join(targets))
        for target in targets:
            if target in out.replies:
                found = self._match(target, out.replies[target], job_id)
                if found is not None and found.job.state == "running":
                    rnd.running = found
                    break
                rnd.other = rnd.other or found
        return rnd

    def locate_targets(self, targets: Sequence[str], job_id: str, *, auto_retry: bool,
                       timeout: float = DIRECT_TIMEOUT) -> Located:
        """The job on one of these agents' nodes, asked in turn (gRPC targets)."""
        return self._retry(job_id, lambda: self._targets(targets, job_id, timeout), auto_retry)

    def _slurm_node(self, job_id: str, auto_retry: bool) -> str:
        """The node of Slurm job `job_id` whose agent opens the session: its BatchHost, from
        one squeue call. Whether the caller may enter the job is the agent's to say."""
        node = slurm_batch_host(job_id, auto_retry, self.query_slurm)
        self._say(f"squeue: job {job_id} runs on {node} (BatchHost)")
        return node

    # The search, with -auto-retry -----------------------------------------------------------

    def locate(self, job_id: str, *, node: str | None = None,
               auto_retry: bool = False) -> Located:
        """Where job `job_id` runs (see the module's docstring for the order). With
        auto_retry, a job that is absent or not running yet is waited for: the same
        question again every RETRY_INTERVAL (one agent, or one bounded fan-out; slurmctld
        is asked once, then the BatchHost's agent)."""
        if node is None and self.cfg.backend == "slurm":
            node = self._slurm_node(job_id, auto_retry)
        fan = node is None and bool(self.cfg.nodes) and self.cfg.backend == "native"

        def one_round() -> _Round:
            return self._fan_out(job_id) if fan else self._direct(node, job_id)

        return self._retry(job_id, one_round, auto_retry)

    def _retry(self, job_id: str, one_round: Callable[[], _Round], auto_retry: bool,
               ) -> Located:
        announced = False

        def done() -> None:
            if announced:
                self.err.write("\n")

        while True:
            rnd = one_round()
            if rnd.running is not None:
                done()
                return rnd.running
            found = rnd.other
            if found is not None and found.job.state == "ending":  # it will not run again
                done()
                raise CliError("Not running", f"job {job_id} is ending on {found.node}")
            if not auto_retry:
                if found is not None:
                    raise CliError("Not running", f"job {job_id} is "
                                   f"{found.job.state or 'not running'} on {found.node}")
                missing = f"no job {job_id} on {rnd.where} (or not yours)"
                if rnd.unanswered:
                    missing += f"; no answer from {describe_unanswered(rnd.unanswered)}"
                raise CliError("Not found", missing)
            if not announced:
                what = f"to be running (now {found.job.state})" if found else "to start"
                self.err.write(f"{self.prog}: waiting for job {job_id} {what}")
                announced = True
            self.err.write(".")
            self.err.flush()
            self.sleep(RETRY_INTERVAL)

    # Every job of the caller, across the cluster ------------------------------------------

    def list_all(self, user: str = "", with_pids: bool = False,
                 ) -> FanOut[pb.ListJobsReply]:
        """ListJobs on every node of `nodes` (no early end): `adoptctl jobs --all`. The
        agents decide what the caller sees (their own jobs; root and admins: all)."""
        nodes = self.cfg.node_names()
        if not nodes:
            raise config_mod.ConfigError(
                f"{self.cfg.path or 'the configuration'}: nodes: not set (--all asks the "
                "agents of the `nodes` key)")
        timeout = self.cfg.locate_timeout

        def open_client(node: str) -> JobLister:
            return self._open(self._target(node), timeout)

        out = fan_out(nodes, open_client,
                      lambda c: c.list_jobs_future(user=user, with_pids=with_pids),
                      parallel=self.cfg.locate_parallel)
        if not out.replies and out.auth_error is not None:
            raise out.auth_error
        return out
