"""Login benchmarks' shared loop: one timed login through a driver (login_driver.py), and
variants run interleaved login by login in a shuffled order each round (block-wise runs
drift by +-20 ms on these machines)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Sequence


def driver_login(driver: subprocess.Popen[str], port: int, host: str = "node2",
                 ) -> tuple[bool, float]:
    """`ssh -p PORT HOST true` by the driver: (succeeded, milliseconds)."""
    assert driver.stdin and driver.stdout
    driver.stdin.write(f"{port} {host}\n")
    driver.stdin.flush()
    rc, ms = driver.stdout.readline().split()
    return rc == "0", float(ms)


def interleaved(variants: Sequence[str], rounds: int, rng: random.Random,
                login: Callable[[str], float]) -> dict[str, list[float]]:
    """Each variant once as a warm-up (first logins pay for caches and channels), then
    `rounds` rounds of every variant in a shuffled order; the times by variant."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        login(v)
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            times[v].append(login(v))
    return times
