"""Reads for the ssh-to-job byte relays (client and agent): large frames for bulk copies.

Every gRPC message costs Python's gRPC about 0.1 ms of CPU whatever its size, and ssh
writes in packets of at most 32 KiB, so relaying each read as it comes makes a bulk copy
CPU-bound on the relays. `read_gathered` reads once; when that read looks like bulk
(at least `bulk` bytes), it keeps reading whatever arrives within `wait` seconds, up to
`limit`. Interactive traffic (small reads) goes out at once. The reads are returned as
they came, so that the frame is built with one copy (node_agent/shellwire.py).
"""

from __future__ import annotations

import ctypes
import os
import select

BULK = 16 * 1024
WAIT = 0.001

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


def read_gathered(fd: int, limit: int, *, bulk: int = BULK,
                  wait: float = WAIT) -> list[bytes]:
    """Up to `limit` bytes from `fd`, in the pieces read; [] at end of file (a read after
    one that found the end mid-gather returns [] too)."""
    data = os.read(fd, limit)
    if not data:
        return []
    if len(data) < bulk:
        return [data]
    parts, size = [data], len(data)
    while size < limit:
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            break
        more = os.read(fd, limit - size)
        if not more:
            break
        parts.append(more)
        size += len(more)
    return parts
