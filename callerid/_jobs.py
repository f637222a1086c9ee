"""The job model shared by the library and its backends, and job-id validation.

A job id ends up as a path component under cgroupfs (``<subtree>/job_<id>``), in SQLite
rows, in environment variables and in log lines, and it arrives from the network (a
CallerId answer, a CLI argument, a scheduler hook). So the alphabet is closed, the length
bounded, and nothing that a path or a terminal would interpret ("/", "..", NUL, control
characters, whitespace) can get through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import InvalidJobId

__all__ = ["JOB_ID_MAX_LEN", "Job", "validate_job_id"]

JOB_ID_MAX_LEN = 64
_ALLOWED = re.compile(r"[A-Za-z0-9_.+-]*")


def validate_job_id(job_id: str) -> str:
    """Return *job_id* unchanged if it is acceptable, else raise :class:`InvalidJobId`.

    Rules: a str of 1..64 characters from ``[A-Za-z0-9_.+-]``, starting with a letter or
    digit, not containing ``..``. Slurm ids (``42``, ``42_7`` array tasks, ``42+1`` het
    jobs) and HTCondor ids (``123.0``) pass; ``../x``, ``a/b``, ``""``, ``"."``, ``" x"``,
    ``"a\\x00b"`` and 4 KiB strings do not.
    """
    if not isinstance(job_id, str):
        raise InvalidJobId(job_id, f"must be a str, not {type(job_id).__name__}")
    if not job_id:
        raise InvalidJobId(job_id, "must not be empty")
    if len(job_id) > JOB_ID_MAX_LEN:
        raise InvalidJobId(job_id, f"longer than {JOB_ID_MAX_LEN} characters ({len(job_id)})")
    if _ALLOWED.fullmatch(job_id) is None:
        bad = next(c for c in job_id if _ALLOWED.fullmatch(c) is None)
        raise InvalidJobId(job_id, f"character {bad!r} not allowed (only A-Z a-z 0-9 _ . + -)")
    if not job_id[0].isalnum():
        raise InvalidJobId(job_id, "must start with a letter or a digit")
    if ".." in job_id:
        raise InvalidJobId(job_id, "must not contain '..'")
    return job_id


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the library sees it: enough to name its cgroups and check ownership.

    ``start_time`` is seconds since the epoch; ``main_pid`` the job's first process when the
    backend knows it. Backends may keep richer records of their own.
    """

    id: str
    user: str
    uid: int
    gid: int
    start_time: float
    main_pid: int | None = None

    def __post_init__(self) -> None:
        validate_job_id(self.id)
