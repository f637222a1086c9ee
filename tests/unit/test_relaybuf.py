"""node_agent.relaybuf: small reads go at once, bulk reads are gathered."""

from __future__ import annotations

import os
import threading
import time

from node_agent.relaybuf import read_gathered


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
