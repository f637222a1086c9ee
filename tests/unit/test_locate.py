"""node_agent/cli/locate.py: job references, the bounded fan-out over `nodes`, and the
Locator every CLI uses (issue 12). Fake agents here (FakeClient); the lab's real ones are in
tests/integration/test_locate.py. No timed asserts: waits are bounded, the assertions are on
what was asked, in which order and how many at once."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest

from node_agent import config as config_mod
from node_agent import jobhome
from node_agent.auth import AuthInterceptor
from node_agent.cli import adoptctl
from node_agent.cli import locate as loc
from node_agent.cli.common import CliError, UsageError
from node_agent.jobs import slurmctl
from node_agent.proto.v1 import agent_pb2 as pb
from node_agent.proto.v1 import agent_pb2_grpc
from tests.unit.fakes import FakeAuthenticator

R = TypeVar("R")
WAIT = 10.0  # bound of every wait below (never reached when the code is right)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


@dataclass
class Cluster:
    """Fake agents by node: jobs per node; some nodes hang until their call's deadline
    (black-holed: the fake raises DEADLINE_EXCEEDED when its client is closed or the
    test's gate opens), some refuse (down), some hold their answer until `gate` opens."""
    jobs: dict[str, list[pb.Job]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    gate: threading.Event = field(default_factory=threading.Event)
    deadline: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    asked: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    # The job index: home -> job id -> the nodes it names; `located` records the homes
    # asked (LocateJob), apart from `asked` (ListJobs). A home missing here answers as an
    # agent without an index does (UNIMPLEMENTED).
    index: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    located: list[str] = field(default_factory=list)

    def opener(self) -> Callable[[str, float], FakeClient]:
        def open_client(target: str, timeout: float) -> FakeClient:
            self.timeouts.append(timeout)
            return FakeClient(self, node_of(target))
        return open_client


def node_of(target: str) -> str:
    """The fake node behind a target: the Locators below map a node to itself (no name is
    ever resolved: no DNS from the tests)."""
    return target.removeprefix("unix:")


def nodes(n: int) -> list[str]:
    return [f"node{i}" for i in range(1, n + 1)]


class FakeClient:
    def __init__(self, cluster: Cluster, node: str) -> None:
        self.cluster, self.node = cluster, node
        self.cancelled = threading.Event()

    def list_jobs(self, user: str = "", job_id: str = "", with_pids: bool = False,
                  ) -> pb.ListJobsReply:
        c = self.cluster
        with c.lock:
            c.asked.append(self.node)
            c.requests.append((user, job_id))
        return self._answer(lambda: pb.ListJobsReply(
            node=self.node, jobs=[j for j in c.jobs.get(self.node, [])
                                  if (not job_id or j.id == job_id)
                                  and (not user or j.user == user)]))

    def locate_job(self, job_id: str) -> pb.LocateJobReply:
        c = self.cluster
        with c.lock:
            c.located.append(self.node)

        def reply() -> pb.LocateJobReply:
            if self.node not in c.index:
                raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED)
            return pb.LocateJobReply(nodes=c.index[self.node].get(job_id, []))
        return self._answer(reply)

    def _answer(self, reply: Callable[[], R]) -> R:
        c = self.cluster
        with c.lock:
            c.inflight += 1
            c.max_inflight = max(c.max_inflight, c.inflight)
        try:
            if self.node in c.down:
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
            if self.node in c.hang:
                # A black hole: nothing comes back; the call ends at its deadline (here:
                # when the test sets `deadline`) or when the fan-out cancels it.
                for _ in range(int(WAIT / 0.01)):
                    if self.cancelled.wait(0.005):
                        raise FakeRpcError(grpc.StatusCode.CANCELLED)
                    if c.deadline.wait(0.005):
                        raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED)
                raise AssertionError("a hung call was never ended")
            if self.node in c.held:
                assert c.gate.wait(WAIT) or self.cancelled.is_set()
                if self.cancelled.is_set():
                    raise FakeRpcError(grpc.StatusCode.CANCELLED)
            return reply()
        finally:
            with c.lock:
                c.inflight -= 1

    def list_jobs_future(self, user: str = "", job_id: str = "", with_pids: bool = False,
                         ) -> FakeCall:
        return FakeCall(self, lambda: self.list_jobs(user=user, job_id=job_id))

    def locate_job_future(self, job_id: str) -> FakeCall:
        return FakeCall(self, lambda: self.locate_job(job_id))

    def close(self) -> None:
        with self.cluster.lock:
            self.cluster.closed.append(self.node)


class FakeCall:
    """The fake's call: it runs (and may block) in a thread of its own from its start, as
    a gRPC future runs in gRPC's threads; done-callbacks run when it ends; cancel() ends
    a blocked one (FutureCancelledError, as gRPC raises)."""

    def __init__(self, client: FakeClient, call: Callable[[], Any]) -> None:
        self.client = client
        self._done = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()
        self._reply: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(call,), daemon=True).start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._reply = call()
        except FakeRpcError as e:
            self._error = grpc.FutureCancelledError() \
                if e.code() == grpc.StatusCode.CANCELLED else e
        with self._lock:
            self._done.set()
            callbacks = list(self._callbacks)
        for fn in callbacks:
            fn(self)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def result(self, timeout: float | None = None) -> Any:
        assert self._done.wait(WAIT)
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply

    def cancel(self) -> bool:
        with self.client.cluster.lock:
            self.client.cluster.cancelled.append(self.client.node)
        self.client.cancelled.set()
        return True


def job(job_id: str, node: str, state: str = "running", user: str = "alice") -> pb.Job:
    return pb.Job(id=job_id, user=user, state=state, node=node)


def cfg_for(names: list[str], **kw: Any) -> config_mod.AgentConfig:
    return config_mod.AgentConfig(nodes=config_mod.parse_nodes(",".join(names)),
                                  node_name="login1", port=411, **kw)


def locator(cluster: Cluster, cfg: config_mod.AgentConfig, err: io.StringIO | None = None,
            **kw: Any) -> loc.Locator:
    kw.setdefault("target_of", lambda node: node or f"unix:{cfg.socket}")
    return loc.Locator(cfg, FakeAuthenticator(), err or io.StringIO(),
                       open_client=cluster.opener(), **kw)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def wait_until(what: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if what():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


# -- job references -----------------------------------------------------------------------

@pytest.mark.parametrize("text, ref", [
    ("42", loc.JobRef("42")),
    ("42@node17", loc.JobRef("42", "node17")),
    ("123.0@gpu01.cluster", loc.JobRef("123.0", "gpu01.cluster")),
    ("42_7@[fd00::5]", loc.JobRef("42_7", "[fd00::5]")),
])
def test_parse_ref(text: str, ref: loc.JobRef) -> None:
    assert loc.parse_ref(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", "@node1", "42@", "42@node1@x", "alice@42@node1",
                                  "42@node1:411", "42@a/b", "42@-x", "42@ node"])
def test_parse_ref_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        loc.parse_ref(text)


# -- the fan-out --------------------------------------------------------------------------

def test_fan_out_never_has_more_than_parallel_calls_in_flight() -> None:
    names = nodes(10)
    cluster = Cluster(held=set(names))
    t, box = in_thread(lambda: loc.fan_out(
        names, lambda n: FakeClient(cluster, n), lambda c: c.list_jobs_future(job_id="42"),
        parallel=3))
    wait_until(lambda: cluster.inflight == 3)
    cluster.gate.set()  # all answer now
    t.join(WAIT)
    assert not t.is_alive() and "error" not in box
    assert cluster.max_inflight == 3  # an unbounded fan-out would have reached 10
    assert sorted(box["result"].replies) == sorted(names)


def test_fan_out_asks_in_order_and_stops_at_the_first_running_match() -> None:
    names = nodes(6)
    cluster = Cluster(jobs={names[3]: [job("42", names[3])]})
    out = loc.fan_out(names, lambda n: FakeClient(cluster, n),
                      lambda c: c.list_jobs_future(job_id="42"), parallel=1,
                      enough=lambda n, r: any(j.state == "running" for j in r.jobs))
    assert cluster.asked == names[:4]  # in the set's order; nothing after the match
    assert out.winner == names[3] and out.not_asked == names[4:]


def test_first_running_match_wins_and_the_calls_in_flight_are_cancelled() -> None:
    names = nodes(4)
    # node1, node2 and node4 never answer; node3 has the job, and answers once all four
    # calls are in flight.
    cluster = Cluster(jobs={names[2]: [job("42", names[2])]},
                      hang={names[0], names[1], names[3]}, held={names[2]})
    t, box = in_thread(lambda: loc.fan_out(
        names, lambda n: FakeClient(cluster, n), lambda c: c.list_jobs_future(job_id="42"),
        parallel=4, enough=lambda n, r: bool(r.jobs)))
    wait_until(lambda: cluster.inflight == 4)
    cluster.gate.set()
    t.join(WAIT)  # no deadline comes: only the cancellation can end the hung calls
    assert not t.is_alive(), "the fan-out waited for calls it should have cancelled"
    out = box["result"]
    assert out.winner == names[2]
    assert sorted(cluster.cancelled) == [names[0], names[1], names[3]]
    assert sorted(cluster.closed) == names  # each client closed once its call ended
    assert out.unanswered == {}  # cancelled calls are not failures


def test_a_match_that_is_not_running_does_not_end_the_search() -> None:
    names = nodes(3)
    cluster = Cluster(jobs={names[0]: [job("42", names[0], "ending")],
                            names[2]: [job("42", names[2])]})
    found = locator(cluster, cfg_for(names, locate_parallel=1)).locate("42")
    assert found.node == names[2] and found.job.state == "running"
    assert found.ref == f"42@{names[2]}"


# -- the Locator --------------------------------------------------------------------------

def homes_of(job_id: str, names: list[str]) -> tuple[str, str]:
    first, second = jobhome.homes(job_id, names)
    return first, second


def test_a_home_that_knows_makes_it_two_calls() -> None:
    """The first home names node7; node7 confirms: no other node is asked, the second
    home neither."""
    names = nodes(32)
    first, second = homes_of("42", names)
    cluster = Cluster(jobs={"node7": [job("42", "node7")]},
                      index={first: {"42": ["node7"]}, second: {"42": ["node7"]}})
    err = io.StringIO()
    found = locator(cluster, cfg_for(names), err, debug=True).locate("42")
    assert (found.node, found.job.state) == ("node7", "running")
    # (the second home is asked only if the first has not answered within HOME_HEDGE,
    # which a loaded machine may take: not asserted here; the benchmark counts the calls)
    assert cluster.located[0] == first and cluster.asked == ["node7"]
    assert f"job 42's home {first} says it runs on node7" in err.getvalue()
    assert "nodes answered" not in err.getvalue()


def test_a_black_holed_first_home_costs_the_hedge_only() -> None:
    """The first home never answers: the second is asked (after HOME_HEDGE), names the
    node, and the first's call is cancelled, long before any deadline."""
    names = nodes(32)
    first, second = homes_of("42", names)
    cluster = Cluster(jobs={"node9": [job("42", "node9")]}, hang={first},
                      index={second: {"42": ["node9"]}})
    t, box = in_thread(lambda: locator(cluster, cfg_for(names)).locate("42"))
    t.join(WAIT)
    assert not t.is_alive() and box["result"].node == "node9"
    assert cluster.located == [first, second] and cluster.cancelled == [first]
    assert cluster.asked == ["node9"]


def test_a_stale_or_foreign_hint_falls_back_to_the_fan_out() -> None:
    """A home names a node where the job no longer runs, and one outside `nodes`: the
    first is asked and says no, the second is never dialed, the fan-out finds it."""
    names = nodes(8)
    first, second = homes_of("42", names)
    cluster = Cluster(jobs={"node5": [job("42", "node5")]},
                      index={first: {"42": ["node2", "evil.example"]},
                             second: {"42": ["node2"]}})
    err = io.StringIO()
    found = locator(cluster, cfg_for(names, locate_parallel=1), err, debug=True).locate("42")
    assert found.node == "node5"
    assert "evil.example" not in cluster.asked
    assert cluster.asked[0] == "node2" and cluster.asked[1:] == names[:5]
    assert "job 42 does not run on node2 after all: asking every node" in err.getvalue()


def test_with_two_nodes_or_fewer_the_homes_are_not_asked() -> None:
    cluster = Cluster(jobs={"node2": [job("42", "node2")]})
    assert locator(cluster, cfg_for(nodes(2))).locate("42").node == "node2"
    assert cluster.located == []


def test_locate_by_fan_out_uses_the_configured_deadline_and_parallelism() -> None:
    names = nodes(8)
    cluster = Cluster(jobs={names[7]: [job("42", names[7])]}, held=set(names))
    cfg = cfg_for(names, locate_parallel=2, locate_timeout=0.75)
    t, box = in_thread(lambda: locator(cluster, cfg).locate("42"))
    wait_until(lambda: cluster.inflight == 2)
    cluster.gate.set()
    t.join(WAIT)
    found = box["result"]
    assert (found.node, found.target) == (names[7], names[7])
    # The job's two homes were asked first (they know nothing: no index here), within
    # HOME_TIMEOUT, then every node within locate_timeout, two at a time.
    assert sorted(cluster.located) == sorted(jobhome.homes("42", names))
    assert cluster.timeouts[:2] == [loc.HOME_TIMEOUT] * 2
    assert set(cluster.timeouts[2:]) == {0.75} and cluster.max_inflight == 2
    assert cluster.requests[0] == ("", "42")


def test_not_found_names_the_nodes_that_did_not_answer() -> None:
    names = nodes(5)
    cluster = Cluster(hang={names[1], names[3]}, down={names[4]})
    cluster.deadline.set()  # the hung calls reach their deadline at once
    err = io.StringIO()
    with pytest.raises(CliError) as e:
        locator(cluster, cfg_for(names), err, debug=True).locate("42")
    assert e.value.category == "Not found"
    assert str(e.value) == (
        f"no job 42 on {config_mod.fold_nodes(names)} (or not yours); no answer from "
        "node[2,4] (Timeout), node5 (Agent unreachable)")
    debug = err.getvalue()
    assert "2 of 5 nodes answered (32 at a time, within 2 s each)" in debug
    assert "no answer from node[2,4] (Timeout)" in debug


def test_another_users_job_is_not_found_like_a_missing_one() -> None:
    # The agents filter ListJobs by the caller (node_agent/agent/service.py): the fake's
    # equivalent is a node that lists nothing for this job.
    names = nodes(2)
    with pytest.raises(CliError, match=r"^no job 42 on .* \(or not yours\)$"):
        locator(Cluster(), cfg_for(names)).locate("42")


def test_nobody_answering_is_one_line_naming_them() -> None:
    names = nodes(3)
    with pytest.raises(CliError) as e:
        locator(Cluster(down=set(names)), cfg_for(names)).locate("42")
    assert e.value.category == "Agent unreachable"
    assert str(e.value) == "no agent answered: node[1-3] (Agent unreachable)"


def test_a_name_that_does_not_resolve_is_named() -> None:
    names = nodes(2)

    def target_of(node: str) -> str:
        if node == names[1]:
            raise ValueError(f"cannot resolve node name {node!r}: Name or service not known")
        return node

    with pytest.raises(CliError, match=r"; no answer from node2 \(cannot resolve node name"):
        locator(Cluster(), cfg_for(names), target_of=target_of).locate("42")


def test_auto_retry_reruns_the_bounded_fan_out() -> None:
    names = nodes(3)
    cluster = Cluster()
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 2:  # the job starts after the second round
            cluster.jobs[names[1]] = [job("42", names[1])]

    err = io.StringIO()
    found = locator(cluster, cfg_for(names, locate_parallel=1), err,
                    sleep=sleep).locate("42", auto_retry=True)
    assert found.node == names[1] and sleeps == [loc.RETRY_INTERVAL] * 2
    # each round asks each node at most once, and the last stops at the match
    assert cluster.asked == names * 2 + names[:2]
    assert err.getvalue() == "ssh-to-job: waiting for job 42 to start..\n"


def test_a_reference_with_its_node_skips_the_search() -> None:
    names = nodes(4)
    cluster = Cluster(jobs={names[2]: [job("42", names[2])]})
    found = locator(cluster, cfg_for(names)).locate("42", node=names[2])
    assert cluster.asked == [names[2]] and found.target == names[2]


def test_without_nodes_the_local_agent_is_asked() -> None:
    cluster = Cluster(jobs={"/run/x.sock": [job("42", "login1")]})
    cfg = config_mod.AgentConfig(socket="/run/x.sock")
    found = locator(cluster, cfg).locate("42")
    assert cluster.asked == ["/run/x.sock"] and found.target == "unix:/run/x.sock"


def test_slurm_backend_asks_squeue_once_then_the_batch_host() -> None:
    names = nodes(3)
    cluster = Cluster(jobs={names[1]: [job("42", names[1])]})
    queries: list[str] = []

    def squeue(job_id: str) -> slurmctl.SlurmJobInfo:
        queries.append(job_id)
        return slurmctl.SlurmJobInfo(job_id, "alice", "RUNNING", names[1], tuple(names[1:]))

    found = locator(cluster, cfg_for(names, backend="slurm"), query_slurm=squeue).locate("42")
    assert queries == ["42"] and cluster.asked == [names[1]] and found.node == names[1]


def test_list_all_asks_every_node_and_needs_nodes() -> None:
    names = nodes(3)
    cluster = Cluster(jobs={names[0]: [job("1", names[0])], names[2]: [job("2", names[2])]},
                      down={names[1]})
    out = locator(cluster, cfg_for(names)).list_all(user="alice")
    assert sorted(cluster.asked) == names and cluster.requests[0] == ("alice", "")
    assert sorted(out.replies) == [names[0], names[2]] and list(out.unanswered) == [names[1]]
    with pytest.raises(config_mod.ConfigError, match="nodes: not set"):
        locator(cluster, config_mod.AgentConfig()).list_all()


# -- adoptctl: refs in its output, jobs --all -----------------------------------------------

def test_adoptctl_jobs_all_prints_refs_and_names_the_silent_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = nodes(3)
    cluster = Cluster(jobs={names[0]: [job("1", names[0])], names[2]: [job("2", names[2])]},
                      down={names[1]})
    monkeypatch.setattr(config_mod, "find", lambda explicit=None: cfg_for(names))
    monkeypatch.setattr(loc.Locator, "_agent_client",
                        lambda self, target, timeout: cluster.opener()(target, timeout))
    monkeypatch.setattr(loc.Locator, "_target", lambda self, node: node)
    out, err = io.StringIO(), io.StringIO()
    rc = adoptctl.main(["jobs", "--all"], out=out, err=err, authenticator=FakeAuthenticator())
    rows = [line.split()[0] for line in out.getvalue().splitlines()]
    assert rows == ["JOBID", f"1@{names[0]}", f"2@{names[2]}"]
    assert rc == 1 and err.getvalue() == (
        f"adoptctl: Incomplete: no answer from {names[1]} (Agent unreachable)\n")
    out = io.StringIO()
    monkeypatch.setattr(config_mod, "find", lambda explicit=None: cfg_for([names[0]]))
    assert adoptctl.main(["jobs", "--all", "--json"], out=out,
                         authenticator=FakeAuthenticator()) == 0
    assert '"ref": "1@node1"' in out.getvalue()


# -- with real gRPC: in-process agents on loopback, real futures, real cancellation -------

class HangingAgent(agent_pb2_grpc.NodeAgentServicer):
    """ListJobs answers `jobs`, or, with `hang`, holds the call until the client goes
    away (and records that it saw the cancellation)."""

    def __init__(self, jobs: list[pb.Job], hang: bool = False) -> None:
        self.jobs, self.hang = jobs, hang
        self.entered = threading.Event()
        self.saw_cancel = threading.Event()

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext,
                 ) -> pb.ListJobsReply:
        self.entered.set()
        if self.hang:
            gone = threading.Event()
            context.add_callback(gone.set)
            if gone.wait(WAIT):
                self.saw_cancel.set()
            context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        return pb.ListJobsReply(node="n", jobs=[j for j in self.jobs if j.id == request.job_id])


def test_real_grpc_calls_in_flight_are_cancelled_at_the_match() -> None:
    auth = FakeAuthenticator()
    servers, targets, agents = [], {}, {}
    try:
        for name, hang in (("node1", True), ("node2", False)):
            agent = HangingAgent([job("42", name)] if not hang else [], hang=hang)  # type: ignore[abstract]
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                 interceptors=[AuthInterceptor(auth, {"ip:127.0.0.1"})])
            agent_pb2_grpc.add_NodeAgentServicer_to_server(agent, server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers.append(server)
            targets[name], agents[name] = f"ipv4:127.0.0.1:{port}", agent
        # A deadline far beyond the bounded waits below: only the cancellation ends node1's.
        cfg = cfg_for(["node1", "node2"], locate_timeout=config_mod.MAX_LOCATE_TIMEOUT)

        def target_of(node: str | None) -> str:
            # (two nodes: no homes are asked, the fan-out is the search) node2 answers
            # only once node1's call hangs in its agent
            if node == "node2":
                assert agents["node1"].entered.wait(WAIT)
            return targets[node or ""]

        err = io.StringIO()
        t, box = in_thread(lambda: loc.Locator(cfg, auth.as_uid(1000), err, debug=True,
                                               target_of=target_of).locate("42"))
        t.join(WAIT)
        assert not t.is_alive(), "the search waited for node1's call instead of cancelling it"
        found = box["result"]
        assert (found.node, found.target) == ("node2", targets["node2"])
        # node1's agent saw its call end (cancelled), long before the call's deadline
        assert agents["node1"].saw_cancel.wait(WAIT)
        assert "no answer from" not in err.getvalue()
    finally:
        for server in servers:
            server.stop(0)
