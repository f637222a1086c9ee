"""Reads for the ssh-to-job byte relays (client and agent): few frames for bulk copies.

Every gRPC message costs Python's gRPC about 0.1 ms of CPU whatever its size, and ssh
writes in packets of at most 32 KiB, so relaying each read as it comes makes a bulk copy
CPU-bound on the relays. `read_gathered` reads once; when that read looks like bulk
(at least `bulk` bytes), it keeps reading whatever arrives within `wait` seconds, up to
`limit`. The reads are returned as they came, so that the frame is built with one copy
(node_agent/shellwire.py).

A bulk copy one way also makes a stream of small messages the other way: ssh's window
adjustments (one per 96 KiB the receiver consumes) and sftp's status replies, about
4,500 per 512 MiB. Sent one frame each, they cost the two relays more CPU than the
copy itself. `Pacer` tells one direction's reads that the other direction carries
bulk: then a small read lingers up to `LINGER` seconds for more (4,500 frames become
about 800). Those messages can wait that long: ssh keeps a 2 MiB window in flight,
about 15 ms of a copy here. Without bulk the other way (typing, a shell's output),
small reads go out at once.
"""

from __future__ import annotations

import ctypes
import os
import select
import time

BULK = 16 * 1024
WAIT = 0.001
# The largest frame a relay gathers. Larger frames cost no less CPU but hold data back:
# at 170 MiB/s a 1 MiB frame is 6 ms of ssh's 2 MiB window sitting in a relay. Measured
# here, 512 MiB scp up / down: 128 KiB 154-166 / 160-168 MiB/s (more CPU), 256 KiB
# 169-175 / 175-178, 512 KiB 163-171 / 163-175, 1 MiB 151-162 / 157-163.
FRAME = 256 * 1024
LINGER = 0.002  # how long a small read waits for company while the other way is bulk
RECENT = 0.05  # the other way counts as bulk this long after its last bulk frame

# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_buffers_in_heap(largest: int = 4 << 20) -> bool:
    """Serve allocations up to `largest` bytes from the heap, and keep freed heap memory.

    A relay allocates a new buffer of up to a MiB for every frame (the read, gRPC's
    message, the frame). By default glibc maps each of those afresh and unmaps it when it
    is freed, so every byte relayed also costs a page fault and a cleared page: a third
    of the agent's system time in a bulk copy. With these settings the same heap memory
    is reused. Returns False where the C library is not glibc (nothing is changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, largest) and
                mallopt(_M_TRIM_THRESHOLD, 8 * largest))


class Pacer:
    """One direction of a relay notes its frames (`saw`); the other asks how long its
    small reads may linger (`linger`)."""

    def __init__(self, linger: float = LINGER, recent: float = RECENT) -> None:
        self._linger = linger
        self._recent = recent
        self._bulk_at = float("-inf")

    def saw(self, size: int) -> None:
        """Note a write of `size` bytes (a bulk one starts the lingering)."""
        if size >= BULK:
            self._bulk_at = time.monotonic()

    def linger(self) -> float:
        """How long a small read may wait for more now (0 unless bulk went by lately)."""
        return self._linger if time.monotonic() - self._bulk_at < self._recent else 0.0


def _readable(fd: int, timeout: float) -> bool:
    """Whether `fd` has data (or its end) within `timeout` seconds. poll, not select:
    select cannot watch a descriptor above 1023, and a busy agent has more open."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def read_gathered(fd: int, limit: int, *, bulk: int = BULK, wait: float = WAIT,
                  linger: float = 0.0) -> list[bytes]:
    """Up to `limit` bytes from `fd`, in the pieces read; [] at end of file (a read after
    one that found the end mid-gather returns [] too). A small first read (under `bulk`)
    goes back at once, or, with `linger`, after what else came within `linger` seconds
    (or as soon as that adds up to `bulk`)."""
    data = os.read(fd, limit)
    if not data:
        return []
    parts, size = [data], len(data)
    if size < bulk:
        if linger <= 0:
            return parts
        until = time.monotonic() + linger
        while size < bulk:
            left = until - time.monotonic()
            if left <= 0:
                return parts
            if not _readable(fd, left):
                return parts
            more = os.read(fd, limit - size)
            if not more:
                return parts
            parts.append(more)
            size += len(more)
    while size < limit:
        if not _readable(fd, wait):
            break
        more = os.read(fd, limit - size)
        if not more:
            break
        parts.append(more)
        size += len(more)
    return parts
