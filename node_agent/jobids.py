"""Job ids as users write them, turned into the id the backend knows: one function per
form, each small, so that the CLIs combine them in one place.

`cluster_proc` takes HTCondor's ``CLUSTER.PROC`` (condor_ssh_to_job's ``32.0``; ``32``
means ``32.0`` there). Where the backend's ids are plain integers (Slurm), ``42.0`` is job
``42``; a PROC other than 0 names no job, and saying so beats an answer about the
scheduler's ``42.1`` (a job *step* in Slurm's own spelling, never a job ssh-to-job can
enter). The native registry's ids are free strings (``callerid.validate_job_id``: ``42.0``
is a name a prolog may have given), so there nothing is rewritten.
"""

from __future__ import annotations

import re

from callerid import InvalidJobId

# Backends whose job ids are integers, by their name in the config -> in a message (Slurm:
# 42; its array tasks 42_7 and het jobs 42+1 are not CLUSTER.PROC and stay as they are).
INTEGER_IDS = {"slurm": "Slurm"}
_CLUSTER_PROC = re.compile(r"([0-9]+)\.([0-9]+)")


def cluster_proc(job_id: str, backend: str) -> str:
    """The backend's id for *job_id* written as ``CLUSTER.PROC``: ``"42.0"`` -> ``"42"``
    on Slurm; ``"42.1"`` there raises InvalidJobId (a ValueError) with one line that says
    why. Any other id, and every id on a backend with free-form ids, comes back as it is.

    >>> cluster_proc("42.0", "slurm"), cluster_proc("42.0", "native")
    ('42', '42.0')
    """
    m = _CLUSTER_PROC.fullmatch(job_id)
    if m is None or backend not in INTEGER_IDS:
        return job_id
    cluster, proc = m.groups()
    if int(proc) != 0:
        raise InvalidJobId(job_id, f"{INTEGER_IDS[backend]} job ids are plain numbers: "
                                   f"CLUSTER.PROC means job CLUSTER only when PROC is 0 "
                                   f"({cluster}.0 is job {cluster}; {job_id} is no job)")
    return cluster
