"""The session caps (node_agent.agent.limits): counting per uid and in total, the exemption of
root and admins from the per-user cap, idempotent release, and the refusal log's
throttle (with a fake clock)."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest

from node_agent.agent.limits import (
    SPARE_WORKERS,
    RefusalLog,
    SessionLimiter,
    SessionLimits,
    TooManySessions,
)
from node_agent.errors import status_for

ALICE, BOB, CAROL = 1001, 1002, 1003


def limiter(total: int = 3, per_user: int = 2) -> SessionLimiter:
    return SessionLimiter(SessionLimits(total, per_user), "node1")


def test_per_user_cap_names_uid_count_node_and_key() -> None:
    lim = limiter()
    lim.acquire(ALICE)
    lim.acquire(ALICE)
    with pytest.raises(TooManySessions) as e:
        lim.acquire(ALICE)
    assert str(e.value) == ("uid 1001 already has 2 ssh-to-job sessions on node1 "
                            "(max_sessions_per_user)")
    assert status_for(e.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e.value))
    assert (lim.held(ALICE), lim.held()) == (2, 2)  # a refusal takes nothing


def test_total_cap_holds_for_everybody_exempt_or_not() -> None:
    lim = limiter()
    lim.acquire(ALICE)
    lim.acquire(BOB)
    lim.acquire(0, exempt=True)
    for uid, exempt in ((CAROL, False), (0, True)):
        with pytest.raises(TooManySessions, match=r"^node1 already has 3 ssh-to-job "
                                                  r"sessions \(max_sessions\)$"):
            lim.acquire(uid, exempt=exempt)


def test_exempt_uids_pass_the_per_user_cap_only() -> None:
    lim = limiter(total=4, per_user=1)
    slots = [lim.acquire(0, exempt=True) for _ in range(3)]
    assert lim.held(0) == 3
    lim.acquire(ALICE)
    with pytest.raises(TooManySessions, match="max_sessions"):
        lim.acquire(0, exempt=True)
    slots[0].release()
    lim.acquire(0, exempt=True)


def test_release_is_idempotent_and_frees_the_place() -> None:
    lim = limiter()
    a = lim.acquire(ALICE)
    lim.acquire(ALICE)
    a.release()
    a.release()  # the handler's thread and the end-of-call callback both call it
    assert (lim.held(ALICE), lim.held()) == (1, 1)
    lim.acquire(ALICE)
    assert lim.held(ALICE) == 2


def test_wait_held_wakes_on_changes() -> None:
    lim = limiter()
    slot = lim.acquire(ALICE)
    assert not lim.wait_held(0, timeout=0)
    t = threading.Thread(target=slot.release)
    t.start()
    assert lim.wait_held(0, timeout=60)
    t.join()
    assert lim.wait_held(0, timeout=0, uid=ALICE)


def test_concurrent_acquires_never_pass_the_caps() -> None:
    lim = limiter(total=10, per_user=4)
    won: list[int] = []
    go = threading.Event()

    def grab(uid: int) -> None:
        go.wait()
        for _ in range(20):
            try:
                lim.acquire(uid)
                won.append(uid)
            except TooManySessions:
                pass

    threads = [threading.Thread(target=grab, args=(uid,)) for uid in (ALICE, BOB, CAROL)
               for _ in range(3)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    assert len(won) == 10 and all(won.count(u) <= 4 for u in (ALICE, BOB, CAROL))
    assert lim.held() == 10


@pytest.mark.parametrize("total, per_user, timeout", [(0, 0, 5.0), (2, 3, 5.0), (2, 0, 5.0),
                                                      (2, 1, 0.0)])
def test_limits_are_checked(total: int, per_user: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        SessionLimits(total, per_user, timeout)


def test_pool_has_a_thread_per_slot_and_spares() -> None:
    assert SessionLimits(10, 2).pool_size == 10 + SPARE_WORKERS
    assert SPARE_WORKERS >= 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refusal_log_throttles_per_uid_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.refusals")
    rl = RefusalLog(logger, interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.refusals")
    for _ in range(5):
        rl.refused(ALICE, "cap", "alice refused")
    rl.refused(BOB, "cap", "bob refused")  # another uid has its own budget
    rl.refused(ALICE, "open-timeout", "alice idle")  # and so has another kind
    clock.now += 10.0
    rl.refused(ALICE, "cap", "alice refused")
    clock.now += 3.0
    rl.refused(ALICE, "cap", "alice refused")  # within the interval again: counted
    clock.now += 10.0
    rl.refused(ALICE, "cap", "alice refused")
    assert [r.getMessage() for r in caplog.records] == [
        "alice refused",
        "bob refused",
        "alice idle",
        "alice refused (and 4 more like it in the 10 s before)",
        "alice refused (and 1 more like it in the 13 s before)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
