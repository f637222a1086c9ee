"""node_agent.agent.warmup: the login watch (inotify) and the warmer's keep-warm logic.

The warmer runs here over a plain directory standing in for a cgroup hierarchy, so its
moves are writes to plain files; what is tested is when it moves and when it stops.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node_agent.agent.warmup import IN_OPEN, LoginWatch, MigrationWarmer, parse_events


def _event(name: bytes, mask: int = IN_OPEN, pad: int = 16) -> bytes:
    field = name + b"\0" * (pad - len(name)) if name else b""
    return struct.pack("iIII", 1, mask, 0, len(field)) + field


def test_parse_events_names_of_opened_files() -> None:
    buf = _event(b"sshd") + _event(b"other", mask=0x2) + _event(b"common-account", pad=32)
    assert parse_events(buf) == ["sshd", "common-account"]


def test_parse_events_skips_nameless_and_truncated() -> None:
    assert parse_events(_event(b"")) == []
    assert parse_events(_event(b"sshd")[:-20]) == []


def _wait(cond: threading.Event | None = None, pred: Callable[[], object] | None = None,
          timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (cond is not None and cond.is_set()) or (pred is not None and pred()):
            return True
        time.sleep(0.01)
    return False


def test_login_watch_calls_back_for_watched_service_only(tmp_path: Path) -> None:
    (tmp_path / "sshd").write_text("account required pam_permit.so\n")
    (tmp_path / "cron").write_text("account required pam_permit.so\n")
    calls: list[float] = []
    watch = LoginWatch(lambda: calls.append(time.monotonic()), ["sshd"], pam_dir=str(tmp_path))
    try:
        assert watch.active
        (tmp_path / "cron").read_text()
        (tmp_path / "sshd").read_text()
        assert _wait(pred=lambda: len(calls) >= 1)
        time.sleep(0.2)
        assert len(calls) == 1
        # A file replaced the way editors do it is still watched (the directory is).
        (tmp_path / "sshd.new").write_text("# new\n")
        os.replace(tmp_path / "sshd.new", tmp_path / "sshd")
        (tmp_path / "sshd").read_text()
        assert _wait(pred=lambda: len(calls) >= 2)
    finally:
        watch.close()
    assert not watch.active


def test_login_watch_off_without_services(tmp_path: Path) -> None:
    watch = LoginWatch(lambda: None, [], pam_dir=str(tmp_path))
    assert not watch.active
    watch.close()


def test_login_watch_missing_dir_is_a_warning_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watch = LoginWatch(lambda: None, ["sshd"], pam_dir=str(tmp_path / "nope"))
    assert not watch.active
    assert "login watch disabled" in caplog.text and "no such directory" in caplog.text
    watch.close()


class CountingWarmer(MigrationWarmer):
    def __init__(self, scratch: Path | None, *, interval: float = 0.002, hold: float = 1.0,
                 burst: int = 4) -> None:
        super().__init__(scratch, interval=interval, hold=hold, burst=burst)
        self.moves = 0

    def _move(self) -> None:
        self.moves += 1
        super()._move()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The agent's own cgroup directory (a fake tree: cgroup.procs are plain files)."""
    return tmp_path / "callerid"


def test_warmer_keeps_moving_until_the_login_arrives(scratch: Path,
                                                     tmp_path: Path) -> None:
    w = CountingWarmer(scratch, interval=0.005, hold=30.0)
    try:
        assert w.enabled
        helper = (tmp_path / "callerid" / ".warmup" / "a" / "cgroup.procs").read_text()
        w.expect_login()
        assert _wait(pred=lambda: w.moves >= 5)
        w.login_arrived()
        assert _wait(pred=lambda: not w._busy)
        stopped_at = w.moves
        time.sleep(0.1)
        assert w.moves == stopped_at
        # It moved the helper, and only the helper.
        files = [tmp_path / "callerid" / ".warmup" / d / "cgroup.procs" for d in "ab"]
        assert {f.read_text() for f in files} == {helper}
    finally:
        w.close()
    assert not Path(f"/proc/{helper.strip()}").exists()  # the helper is gone


def test_warmer_waits_for_every_expected_login(scratch: Path) -> None:
    w = CountingWarmer(scratch, interval=0.005, hold=30.0)
    try:
        w.expect_login()
        w.expect_login()
        w.login_arrived()
        before = w.moves
        assert _wait(pred=lambda: w.moves >= before + 5)  # one still pending
        w.login_arrived()
        assert _wait(pred=lambda: not w._busy)
    finally:
        w.close()


def test_warmer_gives_up_after_hold(scratch: Path) -> None:
    w = CountingWarmer(scratch, interval=0.005, hold=0.1)
    try:
        w.expect_login()  # and the login never comes (failed auth, a stray open)
        assert _wait(pred=lambda: w.moves >= 1)
        assert _wait(pred=lambda: not w._busy, timeout=2.0)
        stopped_at = w.moves
        time.sleep(0.1)
        assert w.moves == stopped_at
    finally:
        w.close()


def test_a_burst_of_logins_pauses_the_keeping(scratch: Path) -> None:
    w = CountingWarmer(scratch, interval=0.005, hold=0.3, burst=3)
    try:
        w.expect_login()
        w.expect_login()
        assert _wait(pred=lambda: w.moves >= 3)  # two at once: still kept
        assert not w.keeping_paused
        w.expect_login()  # the third at once: a burst
        assert w.keeping_paused
        assert _wait(pred=lambda: not w._busy)
        stopped_at = w.moves
        w.expect_login()  # more of the burst: no keeping, however many are pending
        time.sleep(0.1)
        assert w.moves == stopped_at and not w._busy
        w.kick()  # single moves still go
        assert _wait(pred=lambda: w.moves == stopped_at + 1)
        # hold seconds later the crowd has gone: a lone login is kept again.
        for _ in range(4):
            w.login_arrived()
        assert _wait(pred=lambda: not w.keeping_paused, timeout=2.0)
        w.expect_login()
        assert _wait(pred=lambda: w.moves >= stopped_at + 4)
        w.login_arrived()
        assert _wait(pred=lambda: not w._busy)
    finally:
        w.close()


def test_warmer_without_a_scratch_cgroup_does_nothing() -> None:
    w = CountingWarmer(None)
    assert not w.enabled
    w.expect_login()
    w.kick()
    time.sleep(0.05)
    assert w.moves == 0
    w.close()
