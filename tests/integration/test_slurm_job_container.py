"""Slurm's job_container/tmpfs in the lab: a job's private /tmp, entered by adopted logins
(pam_slurm_adopt's and pam_adopt's `join_container`) and by ssh-to-job sessions.

The job on node2 writes its id into its own /tmp; node2's own /tmp never sees it. A login
from node1 (no job there: "one job" on node2) is adopted into the job and, with
join_container (the default of both modules), reads the file; with
`join_container=false`, pam_adopt leaves it in the node's /tmp.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import lab as lab_mod
from tests.integration.slurm import RUNNING_TIMEOUT, scancel, slurm_lab, squeue_state

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    yield from slurm_lab(job_container=True)


@pytest.fixture(scope="module")
def job(lab: lab_mod.Lab) -> Iterator[int]:
    out = lab.run("node1", ["sbatch", "--parsable", "-w", "node2", "-o", "/dev/null",
                            "--wrap", 'echo "job $SLURM_JOB_ID" > /tmp/x; sleep 300'],
                  user="alice", cwd="/tmp").stdout
    job = int(out.strip().split(";")[0])
    try:
        deadline = time.monotonic() + RUNNING_TIMEOUT
        while squeue_state(lab, job) != "RUNNING" or lab.run(
                "node1", ["srun", "--jobid", str(job), "--overlap", "cat", "/tmp/x"],
                user="alice", cwd="/tmp", check=False, timeout=20).stdout.strip() != f"job {job}":
            assert time.monotonic() < deadline, (
                lab.run("node1", ["squeue", "-h", "-t", "all", "-j", str(job), "-o", "%T %R"],
                        check=False).stdout,
                lab.run("node1", ["sinfo", "-h", "-N", "-o", "%N %T %E"], check=False).stdout,
                lab.slurm_log("node2")[-3000:], lab.slurm_log()[-2000:])
            time.sleep(0.2)
        yield job
    finally:
        scancel(lab, job)


def login_reads(lab: lab_mod.Lab) -> str:
    r = lab.run("node1", lab.ssh_argv("node2", "cat /tmp/x 2>/dev/null || echo none"),
                user="alice", check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_job_has_a_private_tmp(lab: lab_mod.Lab, job: int) -> None:
    assert lab.run("node2", ["sh", "-c", "cat /tmp/x 2>/dev/null || echo none"]
                   ).stdout.strip() == "none"


@pytest.mark.parametrize("module", ["slurm", "adopt"])
def test_an_adopted_login_joins_the_jobs_tmp(lab: lab_mod.Lab, job: int, module: str) -> None:
    lab.set_pam_module("node2", module)
    assert login_reads(lab) == f"job {job}"


def test_join_container_false_keeps_the_nodes_tmp(lab: lab_mod.Lab, job: int) -> None:
    lab.set_pam_module("node2", "adopt", ["join_container=false"])
    try:
        assert login_reads(lab) == "none"
    finally:
        lab.set_pam_module("node2", "adopt")


def test_an_ssh_to_job_session_sees_the_jobs_tmp(lab: lab_mod.Lab, job: int) -> None:
    r = lab.run("node1", [lab.venv_bin("ssh-to-job"), str(job), "cat /tmp/x"], user="alice",
                check=False, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, f"job {job}"), r.stderr
