"""Small helpers shared by the integration tests (the lab itself is deploy/lab/lab.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any


def adoptctl(lab: Any, node: str, *argv: str, user: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `adoptctl ARGV...` inside a lab node (as root unless `user`)."""
    result: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin("adoptctl"), *argv], user=user, check=check)
    return result


def wait_for(path: Path, timeout: float = 20.0) -> None:
    """Wait until a file a lab process writes appears."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a killed process may linger as one
    until pid 1 reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
