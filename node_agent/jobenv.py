"""The environment variables callerid-adopt gives a job's processes, named in one place.

A job's main command (the native registry), a login adopted into a job and an ssh-to-job
session all get them. pam_adopt names none of them itself: it exports what the agent's
reply lists (`env=NAME=VALUE`, node_agent/pamcontract.py) with pam_putenv.
tests/unit/test_jobenv.py checks that every `CALLERID_...` name written anywhere in the
repository is one of these (or one of the few that are not a job's).
"""

from __future__ import annotations

import os

JOB_ID = "CALLERID_JOB_ID"       # the job the process belongs to
NODE = "CALLERID_NODE"           # the node's name, as the agent knows it
JOB_PIDS = "CALLERID_JOB_PIDS"   # ssh-to-job: the job's processes, main one first
NAMES = (JOB_ID, NODE, JOB_PIDS)


def of_job(job_id: str, node: str) -> dict[str, str]:
    """What a job's main command and an adopted login get."""
    return {JOB_ID: job_id, NODE: node}


def read_environ(pid: int, procfs: str = "/proc") -> dict[str, str]:
    """A process's environment from ``<procfs>/<pid>/environ`` (OSError if unreadable)."""
    with open(f"{procfs}/{pid}/environ", "rb") as f:
        raw = f.read()
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env
