"""A job's homes: the agents that know where a job of the native registry runs.

Without a scheduler to ask, finding a job over `nodes` would mean asking every node (a
fan-out: its cost grows with the cluster, tests/benchmarks/bench_locate.py). So each job
id has HOMES nodes of `nodes`, its homes, picked by rendezvous (highest random weight)
hashing: every node is scored with SHA-256(node NUL job id) and the highest scores win.
Agents and CLIs compute the same homes from the same `nodes` without talking to each
other, and adding or removing a node moves only the jobs whose homes it was or becomes.

The agent running a job tells its homes (node_agent/agent/jobindex.py); a CLI asks them
first (node_agent/cli/locate.py). Two homes, so that one node down or black-holed leaves
the other to answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: How many homes a job has.
HOMES = 2


def _score(node: str, job_id: str) -> bytes:
    return hashlib.sha256(f"{node}\0{job_id}".encode()).digest()


def homes(job_id: str, nodes: Sequence[str], count: int = HOMES) -> list[str]:
    """The `count` homes of `job_id` among `nodes` (all of them when there are fewer),
    best first.

    >>> homes("42", ["node1"])
    ['node1']
    >>> len(homes("42", [f"node{i}" for i in range(1, 33)]))
    2
    """
    return sorted(dict.fromkeys(nodes), key=lambda n: _score(n, job_id), reverse=True)[:count]
