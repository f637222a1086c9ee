"""pam_adopt with the agents' Slurm backend, on real Slurm in the lab (issue 11).

This module runs its own lab with Slurm and with the agents, whose agent.toml then says
`backend = "slurm"` (deploy/lab/lab/agent.py): the jobs are Slurm's, read from their
slurmstepd sockets, and a login is adopted by slurmstepd (REQUEST_ADD_EXTERN_PID) into
the job's extern step, as pam_slurm_adopt does. Caller ID between the nodes' agents maps
the ssh client's process to the Slurm job it runs in (here an srun step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import lab as lab_mod
from node_agent.pamcontract import MSG_NO_JOBS
from tests.integration.helpers import process_alive
from tests.integration.slurm import (
    KILL_TIMEOUT,
    held_session,
    sbatch_sleep,
    scancel,
    slurm_lab,
    uid_of,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    """This module's lab: Slurm, the agents, pam_adopt on every node."""
    yield from slurm_lab(pam="adopt")


@pytest.fixture
def jobs(lab: lab_mod.Lab) -> Iterator[list[int]]:
    """Jobs submitted by a test, cancelled after it."""
    made: list[int] = []
    yield made
    for job in made:
        scancel(lab, job)


def freezer_of(text: str) -> list[str]:
    return [line.split(":", 2)[2] for line in text.splitlines()
            if line.split(":")[1] == "freezer"]


def test_the_agent_runs_the_slurm_backend(lab: lab_mod.Lab) -> None:
    log = lab.agent_log("node2")
    assert "Slurm backend: node node2, spool dir" in log, log[-2000:]
    assert "PrologFlags" not in log   # the lab's slurm.conf has PrologFlags=contain


def test_one_job_adopted_into_the_extern_step_and_killed_by_scancel(
        lab: lab_mod.Lab, jobs: list[int]) -> None:
    job = sbatch_sleep(lab, "alice", "node2")
    jobs.append(job)
    r = lab.run("node1", lab.ssh_argv("node2", ["cat", "/proc/self/cgroup"]), user="alice",
                check=False)
    assert r.returncode == 0, r.stderr
    assert freezer_of(r.stdout) == [f"/slurm_node2/uid_{uid_of('alice')}/job_{job}"
                                    "/step_extern"], r.stdout
    p, pid = held_session(lab, "alice")
    try:
        listed = lab.run("node2", ["scontrol", "listpids", str(job)]).stdout
        assert [str(pid), str(job), "extern", "-", "-"] in \
            [line.split() for line in listed.splitlines()[1:]], listed
        scancel(lab, job, user="alice")
        deadline = time.monotonic() + KILL_TIMEOUT
        while process_alive(pid):
            assert time.monotonic() < deadline, f"adopted pid {pid} outlived scancel"
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
    assert f"ALLOW one-job job {job}" in lab.agent_log("node2")


def test_a_user_without_a_job_is_denied(lab: lab_mod.Lab, jobs: list[int]) -> None:
    jobs.append(sbatch_sleep(lab, "alice", "node2"))
    r = lab.run("node1", lab.ssh_argv("node2", ["true"]), user="bob", check=False)
    assert r.returncode == 255
    assert MSG_NO_JOBS in r.stderr


def test_two_jobs_the_connection_s_own_job_wins(lab: lab_mod.Lab, jobs: list[int]) -> None:
    """alice has jobs A and B on node1 and node2; an ssh from inside B on node1 (an srun
    step of B) lands in B's extern step on node2: node2's agent asks node1's, whose
    Slurm backend maps the ssh client's cgroup (B's step 0, not its extern step) to B."""
    a = sbatch_sleep(lab, "alice", "node1,node2")
    jobs.append(a)
    b = sbatch_sleep(lab, "alice", "node1,node2")
    jobs.append(b)
    for job, want in ((b, b), (a, a)):
        r = lab.run("node1", ["srun", "--jobid", str(job), "--overlap", "-w", "node1",
                              "-N1", "-n1", *lab.ssh_argv("node2", ["cat", "/proc/self/cgroup"])],
                    user="alice", check=False, cwd="/tmp")
        assert r.returncode == 0, r.stderr
        assert freezer_of(r.stdout) == [f"/slurm_node2/uid_{uid_of('alice')}/job_{want}"
                                        "/step_extern"], (job, r.stdout)
    log = lab.agent_log("node2")
    assert f"ALLOW caller-id job {b}" in log and f"ALLOW caller-id job {a}" in log, log[-3000:]
