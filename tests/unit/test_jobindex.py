"""The job index (issue 12): a job's homes, the home's `JobIndex`, the job side's
`Announcer`, the AnnounceJobs / LocateJob RPCs and `server.job_index(config)`.

Real: node_agent/jobhome.py, JobIndex, Announcer (with a real thread pool: the tests wait
on the futures tick() returns), the servicer behind a real grpc server on 127.0.0.1:0,
AgentConfig. Fake: the clocks (a `Clock` the tests move by hand: nothing here sleeps or
asserts on time), the Announcer's `running()` and `send`, the authenticator
(tests/unit/fakes.py, uids in clear) and the job backend (FakeBackend).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

import callerid
from node_agent import config as config_mod
from node_agent.agent import server as server_mod
from node_agent.agent.jobindex import Announcer, JobIndex, Share
from node_agent.agent.service import NodeAgentServicer
from node_agent.client import AgentClient
from node_agent.errors import InvalidRequest
from node_agent.jobhome import homes
from tests.unit.fakes import FakeAuthenticator, FakeBackend

ALICE = 1001
BOB = 1002
ADMIN = 1500
NODES = [f"n{i:02d}" for i in range(1, 9)]
WAIT = 10.0   # a safety net for futures and events, never an assertion on time


class Clock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- homes() -------------------------------------------------------------------------------

def test_homes_are_deterministic_distinct_members_of_nodes() -> None:
    nodes = [f"node{i}" for i in range(1, 33)]
    for job_id in ("1", "42", "42_7", "123.0", "x" * 64):
        h = homes(job_id, nodes)
        assert h == homes(job_id, list(nodes))          # same answer every time
        assert h == homes(job_id, list(reversed(nodes)))  # whatever the order of nodes
        assert len(h) == 2 and len(set(h)) == 2 and set(h) <= set(nodes)
        assert len(homes(job_id, nodes, count=5)) == 5
        assert homes(job_id, nodes, count=5)[:2] == h   # best first: a prefix


def test_homes_ignore_duplicates_and_take_all_of_a_small_set() -> None:
    assert homes("42", ["a", "a", "a"]) == ["a"]
    assert sorted(homes("42", ["a", "b", "a", "b"])) == ["a", "b"]
    assert sorted(homes("42", ["a", "b", "c", "a", "b"], count=3)) == ["a", "b", "c"]
    assert homes("42", ["a", "b", "c"] * 3, count=2) == homes("42", ["a", "b", "c"])
    assert homes("42", []) == []


def test_adding_a_node_moves_only_the_jobs_it_becomes_a_home_of() -> None:
    nodes = [f"node{i}" for i in range(1, 33)]
    moved = 0
    for n in range(500):
        job_id = str(n)
        before, after = homes(job_id, nodes), homes(job_id, [*nodes, "node33"])
        if before != after:
            assert "node33" in after, (job_id, before, after)
            # the one it displaced is the only change: the other home stays
            assert len(set(before) & set(after)) >= 1, (job_id, before, after)
            moved += 1
    # ~2/33 of the jobs get the new node; none at all would mean it is never picked
    assert 5 <= moved <= 100, moved


def test_homes_spread_over_the_nodes() -> None:
    count = dict.fromkeys(NODES, 0)
    for n in range(1000):
        for h in homes(str(n), NODES):
            count[h] += 1
    # 2000 homes over 8 nodes: 250 each on average; a skewed hash gives far fewer to some
    assert min(count.values()) >= 150, count
    assert sum(count.values()) == 2000


# -- JobIndex ------------------------------------------------------------------------------

def test_replace_and_locate() -> None:
    index = JobIndex(NODES)
    index.replace("n01", [("42", ALICE), ("43", BOB)])
    index.replace("n02", [("44", ALICE)])
    assert index.locate("42", None) == ["n01"]
    assert index.locate("44", None) == ["n02"]
    assert index.locate("45", None) == []
    assert len(index) == 3
    # a new announcement replaces the node's whole share: 43 ended
    index.replace("n01", [("42", ALICE)])
    assert index.locate("43", None) == []
    assert index.locate("42", None) == ["n01"]
    assert len(index) == 2


def test_a_user_sees_only_their_own_jobs() -> None:
    index = JobIndex(NODES)
    index.replace("n01", [("42", ALICE), ("43", BOB)])
    assert index.locate("42", ALICE) == ["n01"]
    assert index.locate("42", BOB) == []       # alice's job: like an unknown one
    assert index.locate("43", BOB) == ["n01"]
    assert index.locate("43", ALICE) == []
    assert index.locate("42", None) == ["n01"]  # root and admins: anyone's


def test_the_most_recent_announcement_comes_first() -> None:
    clock = Clock()
    index = JobIndex(NODES, clock=clock)
    # n08 sorts after n01: the order must come from the time, not the name
    index.replace("n08", [("42", ALICE)])
    clock.now += 1
    index.replace("n01", [("42", ALICE)])
    assert index.locate("42", ALICE) == ["n01", "n08"]
    clock.now += 1
    index.replace("n08", [("42", ALICE)])
    assert index.locate("42", ALICE) == ["n08", "n01"]


def test_an_empty_share_forgets_the_node() -> None:
    index = JobIndex(NODES)
    index.replace("n01", [("42", ALICE)])
    index.replace("n02", [("42", ALICE)])
    index.replace("n01", [])
    assert index.locate("42", None) == ["n02"]
    assert len(index) == 1


def test_a_node_outside_nodes_is_refused_and_changes_nothing() -> None:
    index = JobIndex(NODES)
    index.replace("n01", [("42", ALICE)])
    with pytest.raises(InvalidRequest, match="not one of"):
        index.replace("intruder", [("42", BOB), ("99", BOB)])
    assert index.locate("42", None) == ["n01"]
    assert index.locate("99", None) == []
    assert len(index) == 1


def test_more_jobs_than_the_cap_are_refused_and_the_previous_share_kept() -> None:
    index = JobIndex(NODES, max_jobs_per_node=3)
    index.replace("n01", [("1", ALICE), ("2", ALICE), ("3", ALICE)])   # at the cap: fine
    with pytest.raises(InvalidRequest, match="more than 3"):
        index.replace("n01", [(str(n), ALICE) for n in range(4, 8)])
    assert len(index) == 3
    assert index.locate("3", None) == ["n01"]
    assert index.locate("4", None) == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", " x", "x" * 65])
def test_a_bad_job_id_is_refused_and_changes_nothing(bad: str) -> None:
    index = JobIndex(NODES)
    index.replace("n01", [("5", ALICE)])
    with pytest.raises(callerid.InvalidJobId):
        index.replace("n01", [("6", ALICE), (bad, ALICE)])
    assert index.locate("5", None) == ["n01"]
    assert index.locate("6", None) == []
    assert len(index) == 1


def test_a_share_expires_ttl_seconds_after_its_last_announcement() -> None:
    clock = Clock()
    index = JobIndex(NODES, ttl=10, clock=clock)
    index.replace("n01", [("42", ALICE)])
    index.replace("n02", [("42", ALICE)])
    clock.now += 8
    index.replace("n02", [("42", ALICE)])   # n02 refreshed, n01 not
    clock.now += 2
    assert index.locate("42", ALICE) == ["n02", "n01"]   # n01 exactly at its TTL: kept
    clock.now += 0.5
    assert len(index) == 1                               # (the gauge) n01 no longer counts
    assert index.locate("42", ALICE) == ["n02"]
    assert len(index) == 1                               # n01 forgotten, not just hidden
    clock.now += 8
    assert index.locate("42", ALICE) == []
    assert len(index) == 0


# -- Announcer -----------------------------------------------------------------------------

class Refused(grpc.RpcError):
    """A home's refusal, as a gRPC call raises it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Sends:
    """A recording `send`: (home, share) in the order the sends started. `fail` names
    homes whose sends raise; `block` homes whose sends wait for `release`."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Share]] = []
        self.fail: set[str] = set()
        self.refuse: set[str] = set()
        self.block: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, home: str, share: Share) -> None:
        with self._lock:
            self.log.append((home, share))
        if home in self.block:
            self.entered.set()
            assert self.release.wait(WAIT)
        if home in self.fail:
            raise ConnectionError(f"{home} is down")
        if home in self.refuse:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"'n01' is not one of {home}'s "
                          "nodes")

    def take(self) -> dict[str, Share]:
        """What was sent since the last take(), as home -> share (each home at most once)."""
        with self._lock:
            log, self.log = self.log, []
        homes_sent = [h for h, _ in log]
        assert len(homes_sent) == len(set(homes_sent)), log
        return dict(log)


@dataclass
class Fixture:
    jobs: list[tuple[str, int]]
    sends: Sends
    clock: Clock
    announcer: Announcer

    def tick(self) -> dict[str, Share]:
        """One tick, its sends waited for; what they sent."""
        for f in self.announcer.tick():
            f.result(WAIT)   # re-raises nothing: _announce catches the send's errors
        return self.sends.take()


def expected(jobs: list[tuple[str, int]]) -> dict[str, Share]:
    """Home -> share, computed from homes() independently of Announcer.shares()."""
    want: dict[str, list[tuple[str, int]]] = {}
    for job_id, uid in jobs:
        for h in homes(job_id, NODES):
            want.setdefault(h, []).append((job_id, uid))
    return {h: tuple(sorted(s)) for h, s in want.items()}


@pytest.fixture
def ann() -> Iterator[Fixture]:
    jobs: list[tuple[str, int]] = []
    sends, clock = Sends(), Clock()
    pool = futures.ThreadPoolExecutor(max_workers=4)
    announcer = Announcer(NODES, lambda: list(jobs), sends, refresh=30, retry=5,
                          clock=clock, pool=pool)
    try:
        yield Fixture(jobs, sends, clock, announcer)
    finally:
        sends.release.set()
        announcer.close()
        pool.shutdown(wait=True)


def test_the_first_tick_tells_each_home_its_share_and_no_other_node(ann: Fixture) -> None:
    ann.jobs[:] = [("1", ALICE), ("2", BOB), ("3", ALICE)]
    want = expected(ann.jobs)
    assert len(want) < len(NODES)   # some nodes are homes of none of them
    assert ann.tick() == want


def test_nothing_is_sent_while_nothing_changes(ann: Fixture) -> None:
    assert ann.tick() == {}          # no jobs: no home is told anything
    ann.jobs[:] = [("1", ALICE), ("2", BOB)]
    assert ann.tick() == expected(ann.jobs)
    ann.clock.now += 29
    assert ann.announcer.tick() == []
    assert ann.tick() == {}


def test_a_job_that_ends_updates_its_homes_only(ann: Fixture) -> None:
    ann.jobs[:] = [(str(n), ALICE) for n in range(1, 6)]
    before = expected(ann.jobs)
    assert ann.tick() == before
    ann.jobs.remove(("3", ALICE))
    after = expected(ann.jobs)
    # the homes of job 3, each with its new share (empty when 3 was its only job)
    changed = {h: after.get(h, ()) for h in homes("3", NODES)}
    assert ann.tick() == changed
    assert ann.tick() == {}


def test_an_empty_share_is_sent_once(ann: Fixture) -> None:
    ann.jobs[:] = [("42", ALICE)]
    first = ann.tick()
    assert first == dict.fromkeys(homes("42", NODES), (("42", ALICE),))
    ann.jobs.clear()
    assert ann.tick() == dict.fromkeys(homes("42", NODES), ())
    assert ann.tick() == {}
    ann.clock.now += 100   # and not refreshed either
    assert ann.tick() == {}


def test_every_share_is_sent_again_after_refresh_seconds(ann: Fixture) -> None:
    ann.jobs[:] = [("1", ALICE), ("2", BOB)]
    want = expected(ann.jobs)
    assert ann.tick() == want
    ann.clock.now += 29.5
    assert ann.tick() == {}
    ann.clock.now += 0.5
    assert ann.tick() == want
    ann.clock.now += 10
    assert ann.tick() == {}   # the refresh counts from the last send
    ann.clock.now += 20
    assert ann.tick() == want


def test_a_failed_send_is_retried_after_retry_seconds(ann: Fixture) -> None:
    ann.jobs[:] = [("42", ALICE)]
    down, up = homes("42", NODES)
    ann.sends.fail.add(down)
    share = (("42", ALICE),)
    assert ann.tick() == {down: share, up: share}   # both tried, one failed
    ann.clock.now += 4.5
    assert ann.tick() == {}        # too soon for the failed one; the other is done
    ann.sends.fail.clear()
    ann.clock.now += 0.5
    assert ann.tick() == {down: share}
    ann.clock.now += 1
    assert ann.tick() == {}        # and once it worked, nothing more


def test_a_home_that_refuses_is_asked_again_at_refresh_and_said_once(
        ann: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    """A home with another `nodes` (INVALID_ARGUMENT) will not take the share in seconds:
    one warning, the next try after `refresh`, not `retry`."""
    ann.jobs[:] = [("42", ALICE)]
    refusing, _ = homes("42", NODES)
    ann.sends.refuse.add(refusing)
    share = (("42", ALICE),)
    with caplog.at_level(logging.WARNING, logger="node_agent.jobindex"):
        assert refusing in ann.tick()
        ann.clock.now += 29.5
        assert ann.tick() == {}        # not after `retry` (5 s)
        ann.clock.now += 1
        assert ann.tick()[refusing] == share   # refused again, at refresh
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{refusing} refuses this node's jobs" in warnings[0]
    assert "INVALID_ARGUMENT" in warnings[0]


def test_a_send_in_flight_is_not_started_again(ann: Fixture) -> None:
    ann.jobs[:] = [("42", ALICE)]
    slow, fast = homes("42", NODES)
    ann.sends.block.add(slow)
    pending = ann.announcer.tick()
    assert ann.sends.entered.wait(WAIT)
    # a new job of which `slow` is a home: its share changes while its send waits
    new = next(str(n) for n in range(100, 1000) if slow in homes(str(n), NODES))
    ann.jobs.append((new, ALICE))
    second = ann.announcer.tick()
    ann.clock.now += 100           # and after a refresh, still not a second send
    third = ann.announcer.tick()
    started = [h for h, _ in ann.sends.log]
    assert started.count(slow) == 1, ann.sends.log
    ann.sends.release.set()
    for f in pending + second + third:
        f.result(WAIT)
    ann.sends.log.clear()   # (`fast` may have been sent twice: its share changed too)
    # once it is done, the next tick sends what changed meanwhile
    assert ann.tick()[slow] == expected(ann.jobs)[slow]


# -- AnnounceJobs / LocateJob through a real server ----------------------------------------

@dataclass
class Served:
    auth: FakeAuthenticator
    target: str
    index: JobIndex | None

    def client(self, uid: int) -> AgentClient:
        return AgentClient(self.target, self.auth.as_uid(uid), timeout=5,
                           local_node="n01")


def serve(index: JobIndex | None) -> Iterator[Served]:
    """An agent on 127.0.0.1:0 with `index` (admin uid ADMIN), stopped when done."""
    jobs = FakeBackend("n01")
    resolver = callerid.Resolver(jobs, use_netlink=False)
    servicer = NodeAgentServicer(node="n01", resolver=resolver, jobs=jobs,
                                 admin_uids=(ADMIN,), index=index)
    auth = FakeAuthenticator()
    server, ports = server_mod.create_server(servicer, auth, ["127.0.0.1:0"], max_workers=4)
    server.start()
    try:
        yield Served(auth, f"127.0.0.1:{ports[0]}", index)
    finally:
        server.stop(0)
        resolver.close()


@pytest.fixture
def home() -> Iterator[Served]:
    yield from serve(JobIndex(NODES))


@pytest.fixture
def no_index() -> Iterator[Served]:
    yield from serve(None)


def locate(served: Served, uid: int, job_id: str) -> list[str]:
    with served.client(uid) as c:
        return list(c.locate_job_future(job_id).result().nodes)


def test_root_announces_and_each_user_locates_only_their_own(home: Served) -> None:
    with home.client(0) as root:
        root.announce_jobs("n03", [("42", ALICE), ("43", BOB)])
    assert locate(home, ALICE, "42") == ["n03"]
    assert locate(home, BOB, "42") == []
    assert locate(home, BOB, "999") == []        # bob: alice's job looks like no job
    assert locate(home, BOB, "43") == ["n03"]
    assert locate(home, 0, "42") == ["n03"]
    assert locate(home, ADMIN, "42") == ["n03"]
    assert home.index is not None and len(home.index) == 2


@pytest.mark.parametrize("uid", [ALICE, ADMIN])
def test_only_uid_0_may_announce(home: Served, uid: int,
                                 caplog: pytest.LogCaptureFixture) -> None:
    with home.client(0) as root:
        root.announce_jobs("n03", [("42", ALICE)])
    caplog.set_level(logging.WARNING, logger="node_agent.security")
    with home.client(uid) as c, pytest.raises(grpc.RpcError) as e:
        c.announce_jobs("n04", [("42", uid), ("77", uid)])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert home.index is not None and len(home.index) == 1
    assert locate(home, 0, "42") == ["n03"]
    assert locate(home, 0, "77") == []
    assert any("SECURITY" in r.getMessage() and f"uid {uid}" in r.getMessage()
               for r in caplog.records if r.name == "node_agent.security")


def test_an_announcement_the_index_refuses_is_invalid_argument(home: Served) -> None:
    with home.client(0) as root:
        for node, jobs in (("intruder", [("42", ALICE)]), ("n03", [("../x", ALICE)])):
            with pytest.raises(grpc.RpcError) as e:
                root.announce_jobs(node, jobs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert home.index is not None and len(home.index) == 0


def test_without_an_index_both_rpcs_are_unimplemented(no_index: Served) -> None:
    with no_index.client(0) as root, pytest.raises(grpc.RpcError) as e:
        root.announce_jobs("n03", [("42", ALICE)])
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for uid in (0, ALICE):
        with pytest.raises(grpc.RpcError) as e:
            locate(no_index, uid, "42")
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("job_id", ["../x", "a/b", "", "x" * 65])
def test_locate_with_a_hostile_job_id_is_invalid_argument(home: Served, job_id: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        locate(home, ALICE, job_id)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- server.job_index(config) --------------------------------------------------------------

def test_job_index_only_for_the_native_backend_with_this_node_in_nodes(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node_agent")
    cfg = config_mod.AgentConfig
    assert server_mod.job_index(cfg(node_name="n01", nodes="n[01-08]", backend="slurm")) is None
    assert server_mod.job_index(cfg(node_name="n01", nodes="")) is None
    assert not caplog.records
    assert server_mod.job_index(cfg(node_name="other", nodes="n[01-08]")) is None
    assert any("other" in r.getMessage() and "not in nodes" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    index = server_mod.job_index(cfg(node_name="n03", nodes="n[01-08]"))
    assert isinstance(index, JobIndex)
    assert index.nodes == frozenset(NODES)
