"""The lab's two errors: one for the lab itself, one for a command run inside a node.

    RuntimeError
     +-- LabError            the lab could not do what was asked (the message says where to look)
    subprocess.CalledProcessError
     +-- LabCommandError     a command run in a node failed (``Lab.run(..., check=True)``)
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says what and where to look."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run in a node failed; ``str()`` shows the command, rc, stdout and stderr."""

    def __init__(
        self, node: str, returncode: int, cmd: Sequence[str], output: str, stderr: str
    ) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.node = node

    def __str__(self) -> str:
        return (
            f"command in {self.node} failed with rc={self.returncode}: "
            f"{shlex.join(self.cmd)}\n--- stdout ---\n{self.output or ''}"
            f"--- stderr ---\n{self.stderr or ''}"
        )
