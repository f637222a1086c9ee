"""What slurmctld knows of a job, for the CLIs: one ``squeue`` call with a fixed format.

The CLIs on any node (a login node too) find the node of a Slurm job here, not by asking
the node agents: ``squeue -h -j ID -o '%u|%T|%B|%N'`` gives the job's user, state,
BatchHost (the node that runs the batch script; for ``salloc`` the first node of the
allocation) and node list, in one request to slurmctld. Nothing here polls slurmctld: a
caller that waits for a job to start asks its agent again, not Slurm (ssh-to-job
``-auto-retry``). The ``squeue`` found in ``PATH`` is used, with the user's own
credentials (MUNGE), so that ``PrivateData=jobs`` hides what it hides from ``squeue``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from node_agent.jobs.slurmconf import expand_hostlist

#: squeue's fields, in this order: user name, state (long form), BatchHost, node list.
SQUEUE_FORMAT = "%u|%T|%B|%N"
SQUEUE_TIMEOUT = 10.0   # slurmctld answers in ms; squeue's own retries take longer


class SlurmQueryError(RuntimeError):
    """squeue could not answer (not installed, slurmctld down, a malformed answer)."""


class SlurmJobUnknown(LookupError):
    """slurmctld does not know the job (never existed, or long gone)."""


@dataclass(frozen=True)
class SlurmJobInfo:
    """One job as slurmctld sees it."""

    job_id: str
    user: str
    state: str           # RUNNING, PENDING, COMPLETING, ...
    batch_host: str      # "" while pending
    nodes: tuple[str, ...]

    @property
    def running(self) -> bool:
        """Whether it has its nodes and runs (a job being configured does not yet)."""
        return self.state == "RUNNING"


def parse_squeue(job_id: str, text: str) -> SlurmJobInfo:
    """The answer of ``squeue -h -j JOB -o SQUEUE_FORMAT``: SlurmJobUnknown when empty,
    SlurmQueryError when malformed. A job array's tasks or a heterogeneous job's
    components come as several lines: the first is taken."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SlurmJobUnknown(job_id)
    fields = lines[0].split("|")
    if len(fields) != 4 or not fields[0] or not fields[1]:
        raise SlurmQueryError(f"squeue gave {lines[0]!r} for job {job_id}")
    user, state, batch, nodelist = (f.strip() for f in fields)
    if batch in ("n/a", "(null)"):
        batch = ""
    try:
        nodes = tuple(expand_hostlist(nodelist)) if nodelist and state != "PENDING" else ()
    except ValueError as e:
        raise SlurmQueryError(f"squeue gave node list {nodelist!r} for job {job_id}: {e}") \
            from None
    return SlurmJobInfo(job_id, user, state, batch or (nodes[0] if nodes else ""), nodes)


def query_job(job_id: str, *, squeue: str = "squeue",
              timeout: float = SQUEUE_TIMEOUT) -> SlurmJobInfo:
    """Ask slurmctld (one squeue call, bounded by `timeout`) about one job."""
    if not job_id.isdigit():
        raise SlurmJobUnknown(job_id)
    argv = [squeue, "-h", "-j", job_id, "-o", SQUEUE_FORMAT]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except FileNotFoundError:
        raise SlurmQueryError(f"{squeue}: not found (the Slurm client commands are "
                              "needed to find a Slurm job's node; or give -name NODE)") \
            from None
    except subprocess.TimeoutExpired:
        raise SlurmQueryError(f"squeue did not answer within {timeout:g} s") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if "Invalid job id" in why:
            raise SlurmJobUnknown(job_id)
        raise SlurmQueryError(f"squeue: {why}")
    return parse_squeue(job_id, r.stdout)
