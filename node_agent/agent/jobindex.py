"""The job index: which node runs a job of the native registry, kept by the job's homes.

Each job id has two homes among `nodes` (node_agent/jobhome.py). Two halves, both in
every agent whose configuration has `nodes` and the native backend:

- `Announcer` (the job's side): once a second it reads this node's running jobs and,
  for each home whose share changed, sends that home the whole share (`AnnounceJobs`,
  which replaces what the home knew of this node: a job that ended is dropped by the
  next announcement, no separate "gone" message to lose). Every share is sent again every
  REFRESH seconds, so a home that restarted learns it again. Sends run in a small pool,
  one at a time per home, each with its deadline: a home down or black-holed delays
  neither the others nor anything else the agent does.
- `JobIndex` (the home's side): node -> (when announced, {job id: uid}). A node's share
  expires TTL seconds after its last announcement (an agent that stopped for good, a node
  removed from `nodes`). `locate` answers the caller's own jobs only (root and admin
  uids: any), so another user's job looks like a missing one, as everywhere in the API.

Who can fill or poison it: only uid 0 may announce (an agent's MUNGE credential), only
as a node of `nodes`, at most MAX_JOBS_PER_NODE jobs each: the index holds at most
len(nodes) x MAX_JOBS_PER_NODE entries. A wrong entry (a root elsewhere lying, a share not
yet expired) costs a search, never a wrong job: the CLI asks the named node's agent,
which answers for its own jobs only, and falls back to the fan-out over `nodes`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent import futures

import grpc

import callerid
from node_agent.errors import InvalidRequest
from node_agent.jobhome import homes

log = logging.getLogger("node_agent.jobindex")

#: Seconds between two looks at this node's jobs (what a new job waits, at most, to be
#: found without a search).
INTERVAL = 1.0
#: Every share is sent again this often, changed or not.
REFRESH = 30.0
#: A share not announced again for this long is forgotten.
TTL = 3 * REFRESH + 10
#: At most this many jobs from one node.
MAX_JOBS_PER_NODE = 4096
#: After a failed send to a home, the next try waits this long.
RETRY = 5.0
#: Each announcement's deadline.
SEND_TIMEOUT = 2.0
#: A home's answers that mean "not from you" rather than "not now": tried again after
#: REFRESH, not RETRY.
REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.UNIMPLEMENTED})

Share = tuple[tuple[str, int], ...]   # ((job id, uid), ...) sorted


class JobIndex:
    """What this agent, as a home, knows of other nodes' jobs."""

    def __init__(self, nodes: Collection[str], *, ttl: float = TTL,
                 max_jobs_per_node: int = MAX_JOBS_PER_NODE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = frozenset(nodes)
        self.ttl = ttl
        self.max_jobs_per_node = max_jobs_per_node
        self._clock = clock
        self._shares: dict[str, tuple[float, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def replace(self, node: str, jobs: Sequence[tuple[str, int]]) -> None:
        """`node` runs `jobs` ((job id, uid), ...) of which this agent is a home: forget
        what it said before. InvalidRequest for a node outside `nodes` or too many jobs,
        callerid.InvalidJobId for a bad job id (nothing is changed then)."""
        if node not in self.nodes:
            raise InvalidRequest(f"{node!r} is not one of this agent's nodes")
        if len(jobs) > self.max_jobs_per_node:
            raise InvalidRequest(f"{len(jobs)} jobs announced by {node}, more than "
                                 f"{self.max_jobs_per_node}")
        share = {}
        for job_id, uid in jobs:
            callerid.validate_job_id(job_id)   # InvalidJobId: INVALID_ARGUMENT
            share[job_id] = uid
        with self._lock:
            if share:
                self._shares[node] = (self._clock(), share)
            else:
                self._shares.pop(node, None)

    def locate(self, job_id: str, uid: int | None) -> list[str]:
        """The nodes announced running `job_id`, the most recent announcement first: of
        the user `uid`'s jobs only (None: any user's)."""
        now = self._clock()
        found: list[tuple[float, str]] = []
        with self._lock:
            for node, (when, share) in list(self._shares.items()):
                if now - when > self.ttl:
                    del self._shares[node]
                    continue
                owner = share.get(job_id)
                if owner is not None and (uid is None or owner == uid):
                    found.append((when, node))
        return [node for _, node in sorted(found, reverse=True)]

    def __len__(self) -> int:
        """The entries of shares that have not expired."""
        now = self._clock()
        with self._lock:
            return sum(len(share) for when, share in self._shares.values()
                       if now - when <= self.ttl)


class Announcer:
    """Tells the homes of this node's running jobs (see the module's docstring).

    `running()` lists this node's running jobs as (job id, uid); `send(home, share)`
    announces a share to a home (raises on failure)."""

    def __init__(self, nodes: Sequence[str],
                 running: Callable[[], list[tuple[str, int]]],
                 send: Callable[[str, Share], None], *, interval: float = INTERVAL,
                 refresh: float = REFRESH, retry: float = RETRY,
                 clock: Callable[[], float] = time.monotonic,
                 pool: futures.Executor | None = None) -> None:
        self.nodes = list(nodes)
        self._running, self._send = running, send
        self.interval, self.refresh, self.retry = interval, refresh, retry
        self._clock = clock
        self._pool = pool or futures.ThreadPoolExecutor(max_workers=4,
                                                        thread_name_prefix="announce")
        self._homes: dict[str, list[str]] = {}
        self._sent: dict[str, tuple[Share, float]] = {}    # home -> (share, when)
        self._failed: dict[str, float] = {}                # home -> when it last failed
        self._inflight: set[str] = set()
        self._refused: set[str] = set()                    # homes that said no (logged)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _homes_of(self, job_id: str) -> list[str]:
        h = self._homes.get(job_id)
        if h is None:
            h = self._homes[job_id] = homes(job_id, self.nodes)
        return h

    def shares(self) -> dict[str, Share]:
        """Home -> the share it should have now (every home of a running job)."""
        by_home: dict[str, list[tuple[str, int]]] = {}
        jobs = self._running()
        for job_id, uid in jobs:
            for home in self._homes_of(job_id):
                by_home.setdefault(home, []).append((job_id, uid))
        if len(self._homes) > 4 * len(jobs) + 1024:   # forget the homes of old jobs
            self._homes = {j: self._homes[j] for j, _ in jobs if j in self._homes}
        return {home: tuple(sorted(share)) for home, share in by_home.items()}

    def tick(self) -> list[futures.Future[None]]:
        """One look: start the sends that are due; returns them (tests wait on them)."""
        now = self._clock()
        want = self.shares()
        due_now: list[tuple[str, Share]] = []
        with self._lock:
            for home in sorted(set(want) | set(self._sent)):
                share = want.get(home, ())
                if home in self._inflight:
                    continue
                failed = self._failed.get(home)
                if failed is not None and now - failed < self.retry:
                    continue
                last = self._sent.get(home)
                if last is None:
                    due = bool(share)   # a home never told: tell it when there is news
                else:
                    due = last[0] != share or (bool(share) and now - last[1] >= self.refresh)
                if not due:
                    continue
                self._inflight.add(home)
                due_now.append((home, share))
        # (submitted outside the lock: a send that ends at once takes it)
        return [self._pool.submit(self._announce, home, share) for home, share in due_now]

    def _announce(self, home: str, share: Share) -> None:
        try:
            self._send(home, share)
        except Exception as e:  # noqa: BLE001  (a home down: try again later)
            code = e.code() if isinstance(e, grpc.RpcError) else None
            when = self._clock()
            if code in REFUSALS:
                # The home refuses (another `nodes`, an agent without an index): that
                # will not change in seconds. Said once per home, tried again at refresh.
                if home not in self._refused:
                    details = e.details() if isinstance(e, grpc.RpcError) else ""
                    log.warning("job index: %s refuses this node's jobs (%s: %s); they "
                                "are found by the fan-out until it takes them", home,
                                code.name, details)
                    self._refused.add(home)
                when += max(0.0, self.refresh - self.retry)
            else:
                log.debug("announcing %d jobs to %s failed: %s", len(share), home, e)
            with self._lock:
                self._failed[home] = when
                self._inflight.discard(home)
            return
        self._refused.discard(home)
        with self._lock:
            self._failed.pop(home, None)
            if share:
                self._sent[home] = (share, self._clock())
            else:
                self._sent.pop(home, None)
            self._inflight.discard(home)

    def start(self) -> None:
        """Look every `interval` seconds in a thread of its own, until close()."""
        self._thread = threading.Thread(target=self._loop, name="announcer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001  (never let the index stop the agent)
                log.exception("job index: announcing failed")

    def close(self) -> None:
        """Stop looking, and wait for the sends in flight (each ends within its deadline:
        the channels they use are closed next, and gRPC Python may crash when a channel is
        closed under a call, grpc/grpc#16290)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
