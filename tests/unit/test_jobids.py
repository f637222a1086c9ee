"""Job ids as users write them (node_agent.jobids): HTCondor's CLUSTER.PROC."""

from __future__ import annotations

import pytest

from callerid import InvalidJobId
from node_agent import jobids


@pytest.mark.parametrize(("job_id", "backend", "expect"), [
    ("42.0", "slurm", "42"),          # condor_ssh_to_job 42.0 -> Slurm job 42
    ("42.00", "slurm", "42"),
    ("42", "slurm", "42"),
    ("42_7", "slurm", "42_7"),        # an array task: not CLUSTER.PROC
    ("42+1", "slurm", "42+1"),        # a het job component
    ("42.batch", "slurm", "42.batch"),  # not numbers: Slurm answers for it
    ("x.0", "slurm", "x.0"),
    ("42.0", "native", "42.0"),       # free-form ids: "42.0" may be a job's own name
    ("42.1", "native", "42.1"),
])
def test_cluster_proc(job_id: str, backend: str, expect: str) -> None:
    assert jobids.cluster_proc(job_id, backend) == expect


def test_a_proc_other_than_0_on_slurm_is_one_clear_line() -> None:
    with pytest.raises(InvalidJobId) as e:
        jobids.cluster_proc("42.1", "slurm")
    message = str(e.value)
    assert "\n" not in message
    assert message == ("invalid job id '42.1': Slurm job ids are plain numbers: CLUSTER.PROC "
                       "means job CLUSTER only when PROC is 0 (42.0 is job 42; 42.1 is no "
                       "job)")
    assert isinstance(e.value, ValueError)
