"""node_agent.relaybuf: small reads go at once (or linger while the other way is bulk),
bulk reads are gathered."""

from __future__ import annotations

import os
import resource
import threading
import time

import pytest

from node_agent.relaybuf import BULK, Pacer, read_gathered


def test_small_read_is_returned_at_once() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"ls\n")
        assert read_gathered(r, 1 << 20) == [b"ls\n"]
    finally:
        os.close(r)
        os.close(w)


def test_bulk_read_gathers_what_keeps_coming() -> None:
    r, w = os.pipe()
    chunk = b"x" * 32768

    def writer() -> None:
        for _ in range(8):  # 256 KiB in 32 KiB packets, like ssh's
            os.write(w, chunk)
            time.sleep(0.0002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        got = read_gathered(r, 1 << 20, wait=0.05)
        assert b"".join(got) == chunk * 8  # one frame, not eight
        assert len(got) > 1  # in the pieces read: the frame is built with one copy
    finally:
        t.join(5)
        os.close(r)
        os.close(w)


def test_gathering_stops_at_the_limit_and_at_a_pause() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"y" * 40000)
        assert len(b"".join(read_gathered(r, 50000, wait=0.01))) == 40000  # nothing more came
        os.write(w, b"z" * 60000)
        assert len(b"".join(read_gathered(r, 50000, wait=0.01))) == 50000  # the limit
        assert len(b"".join(read_gathered(r, 50000, wait=0.01))) == 10000
    finally:
        os.close(r)
        os.close(w)


def test_end_of_file_mid_gather() -> None:
    r, w = os.pipe()
    os.write(w, b"q" * 20000)
    os.close(w)
    try:
        assert read_gathered(r, 1 << 20) == [b"q" * 20000]
        assert read_gathered(r, 1 << 20) == []
    finally:
        os.close(r)


def test_a_small_read_lingers_for_company_when_asked() -> None:
    r, w = os.pipe()

    def writer() -> None:
        for _ in range(5):  # replies trickling back, like sftp's status messages
            os.write(w, b"s" * 40)
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        got = read_gathered(r, 1 << 20, linger=0.5)
        # all five in one frame (however many reads a loaded machine needed for them)
        assert b"".join(got) == b"s" * 200
    finally:
        t.join(5)
    try:
        # It lingers no longer than asked: nothing more comes.
        os.write(w, b"t")
        t0 = time.monotonic()
        assert read_gathered(r, 1 << 20, linger=0.05) == [b"t"]
        assert 0.04 < time.monotonic() - t0 < 1.0
        # And stops lingering once it has bulk's worth.
        os.write(w, b"u" * 10)
        later = threading.Timer(0.05, os.write, (w, b"v" * BULK))
        later.start()
        t0 = time.monotonic()
        assert b"".join(read_gathered(r, 1 << 20, linger=5.0, wait=0.0)) == (
            b"u" * 10 + b"v" * BULK)
        assert time.monotonic() - t0 < 2.0
        later.join()
    finally:
        os.close(r)
        os.close(w)


def test_pacer_lingers_only_while_the_other_way_is_bulk() -> None:
    pacer = Pacer(linger=0.002, recent=0.1)
    assert pacer.linger() == 0.0  # nothing seen: typing goes out at once
    pacer.saw(100)
    assert pacer.linger() == 0.0  # small frames the other way: still interactive
    pacer.saw(BULK)
    assert pacer.linger() == 0.002
    time.sleep(0.15)
    assert pacer.linger() == 0.0  # the bulk has stopped


def test_descriptors_above_1023_are_read_too() -> None:
    """A busy agent has more than 1024 descriptors open: select() could not watch them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves no descriptor above 1500")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1600), hard))
    r, w = os.pipe()
    high = os.dup2(r, 1500)
    try:
        os.write(w, b"x" * BULK)
        os.write(w, b"y" * 10)
        assert b"".join(read_gathered(high, 1 << 20)) == b"x" * BULK + b"y" * 10
        os.write(w, b"z")
        assert read_gathered(high, 1 << 20, linger=0.01) == [b"z"]
    finally:
        for fd in (r, w, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
