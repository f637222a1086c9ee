"""Reads for the ssh-to-job byte relays (client and agent): large frames for bulk copies.

Every gRPC message costs Python's gRPC about 0.1 ms of CPU whatever its size, and ssh
writes in packets of at most 32 KiB, so relaying each read as it comes makes a bulk copy
CPU-bound on the relays. `read_gathered` reads once; when that read looks like bulk
(at least `bulk` bytes), it keeps reading whatever arrives within `wait` seconds, up to
`limit`. Interactive traffic (small reads) goes out at once. The reads are returned as
they came, so that the frame is built with one copy (node_agent/shellwire.py).
"""

from __future__ import annotations

import os
import select

BULK = 16 * 1024
WAIT = 0.001


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
