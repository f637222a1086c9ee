"""Caps on ssh-to-job sessions, so that no user can starve the agent or other users.

An OpenJobShell stream holds a thread of the agent from the moment its handler starts
until its session is cleaned up, and a running session is an ``sshd`` process and two
relay threads more. Without a bound, any user could take every thread (idle streams need
no job) and, on a server whose threads every method shares, stop the agent from
answering CallerId: other users' logins from this node would land in the wrong job.

`SessionLimiter` counts streams per uid and in total. A stream takes a `SessionSlot`
when its handler starts, *before* its first frame: a stream that sends nothing counts
(and is ended after `SessionLimits.open_timeout`). It gives the slot back when its thread
is done with it. Past a cap, `acquire` raises `TooManySessions`, which the client sees as
RESOURCE_EXHAUSTED with a message that names the cap::

    uid 1001 already has 16 ssh-to-job sessions on node1 (max_sessions_per_user)
    node1 already has 64 ssh-to-job sessions (max_sessions)

Root and the admin uids are not held to ``max_sessions_per_user`` (they may end any job
anyway, and a site's tools may open sessions into many jobs), but they count toward
``max_sessions`` like everybody: the total, and with it the number of threads sessions
can hold, is bounded whoever opens them. The sessions run in a thread pool of their own,
`SessionLimits.pool_size` threads (node_agent/agent/server.py), so they never hold a thread
that CallerId, ListJobs or the job methods need.

`RefusalLog` logs refusals without letting a user who retries in a loop flood the log
(and with it the journal's rate limit, which would drop everyone's lines).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from node_agent.config import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_USER,
    DEFAULT_OPEN_TIMEOUT,
)
from node_agent.errors import AgentError

#: Threads of the session pool beyond max_sessions. While every slot is held, streams
#: past a cap still need a thread to be authenticated and refused; these answer them at
#: once instead of leaving them queued behind the sessions.
SPARE_WORKERS = 8


class TooManySessions(AgentError):
    """A cap on ssh-to-job sessions is reached; the message names it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class SessionLimits:
    """ssh-to-job's caps: sessions in total, per user, and the seconds a stream may take to
    open."""
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_user: int = DEFAULT_MAX_SESSIONS_PER_USER
    # Seconds a stream may take to send its `open` frame.
    open_timeout: float = DEFAULT_OPEN_TIMEOUT

    def __post_init__(self) -> None:
        # node_agent/config.py gives the user-facing messages; this catches a caller
        # that builds limits by hand.
        if not 1 <= self.max_sessions_per_user <= self.max_sessions:
            raise ValueError(f"need 1 <= max_sessions_per_user ({self.max_sessions_per_user})"
                             f" <= max_sessions ({self.max_sessions})")
        if not self.open_timeout > 0:
            raise ValueError(f"open_timeout must be positive, not {self.open_timeout}")

    @property
    def pool_size(self) -> int:
        """Threads of the session pool: every slot, plus some to refuse the rest."""
        return self.max_sessions + SPARE_WORKERS


class SessionSlot:
    """One stream's place under the caps. `release` is idempotent: both the handler's
    thread and the end-of-call callback call it, whichever comes first frees it."""

    def __init__(self, limiter: SessionLimiter, uid: int) -> None:
        self.uid = uid
        self._limiter = limiter
        self._held = True

    def release(self) -> None:
        """Give the slot back (once the session's clean-up is done)."""
        self._limiter._release(self)


class SessionLimiter:
    """Counts the streams of each uid and of the node against `SessionLimits`."""

    def __init__(self, limits: SessionLimits, node: str) -> None:
        self.limits = limits
        self.node = node
        self._lock = threading.Lock()
        self._total = 0
        self._per_uid: dict[int, int] = {}
        self._changed = threading.Condition(self._lock)

    def acquire(self, uid: int, exempt: bool = False) -> SessionSlot:
        """A slot for one stream of `uid` (`exempt`: not held to the per-user cap), or
        TooManySessions."""
        with self._lock:
            mine = self._per_uid.get(uid, 0)
            if not exempt and mine >= self.limits.max_sessions_per_user:
                raise TooManySessions(
                    f"uid {uid} already has {mine} ssh-to-job sessions on {self.node} "
                    f"(max_sessions_per_user)")
            if self._total >= self.limits.max_sessions:
                raise TooManySessions(
                    f"{self.node} already has {self._total} ssh-to-job sessions "
                    f"(max_sessions)")
            self._per_uid[uid] = mine + 1
            self._total += 1
            self._changed.notify_all()
            return SessionSlot(self, uid)

    def _release(self, slot: SessionSlot) -> None:
        with self._lock:
            if not slot._held:
                return
            slot._held = False
            self._total -= 1
            left = self._per_uid[slot.uid] - 1
            if left:
                self._per_uid[slot.uid] = left
            else:
                del self._per_uid[slot.uid]
            self._changed.notify_all()

    def held(self, uid: int | None = None) -> int:
        """Slots held now, by `uid` or in total."""
        with self._lock:
            return self._total if uid is None else self._per_uid.get(uid, 0)

    def wait_held(self, count: int, timeout: float, uid: int | None = None) -> bool:
        """Wait until exactly `count` slots are held (by `uid`, or in total); False if
        that did not happen within `timeout` seconds. For tests and diagnostics."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (self._total if uid is None else self._per_uid.get(uid, 0)) != count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


class RefusalLog:
    """Logs refusals, at most one line per (uid, kind) every `interval` seconds. The
    refusals in between are counted, and the next line for that uid and kind says how
    many there were: a user who retries in a loop costs a line every `interval`."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # (uid, kind) -> (time of the last line, refusals not logged since)
        self._state: dict[tuple[int, str], tuple[float, int]] = {}

    def refused(self, uid: int, kind: str, message: str) -> None:
        """Log a refusal, at most once per uid and kind every interval (the rest are
        counted)."""
        now = self._clock()
        with self._lock:
            last, quiet = self._state.get((uid, kind), (None, 0))
            if last is not None and now - last < self._interval:
                self._state[(uid, kind)] = (last, quiet + 1)
                return
            self._state[(uid, kind)] = (now, 0)
            if len(self._state) > 4096:  # uids come and go: forget the stale ones
                self._state = {k: v for k, v in self._state.items()
                               if now - v[0] < self._interval or v[1]}
        more = (f" (and {quiet} more like it in the {now - last:.0f} s before)"
                if quiet and last is not None else "")
        self._log.warning("%s%s", message, more)
