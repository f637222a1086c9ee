"""node_agent.jobs.slurmctl: a Slurm job's node from one squeue call, and ssh-to-job's use
of it (a fake squeue script in PATH stands for Slurm's)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from node_agent.cli.common import CliError
from node_agent.cli.locate import slurm_batch_host as slurm_node
from node_agent.jobs.slurmctl import (
    SQUEUE_FORMAT,
    SlurmJobInfo,
    SlurmJobUnknown,
    SlurmQueryError,
    parse_squeue,
    query_job,
)


def test_parse_a_running_job() -> None:
    assert parse_squeue("42", "alice|RUNNING|node2|node[2-3]\n") == \
        SlurmJobInfo("42", "alice", "RUNNING", "node2", ("node2", "node3"))


def test_parse_a_pending_job_has_no_node() -> None:
    info = parse_squeue("42", "alice|PENDING|n/a|\n")
    assert (info.batch_host, info.nodes, info.running) == ("", (), False)


def test_parse_no_batch_host_takes_the_first_node() -> None:
    assert parse_squeue("7", "bob|RUNNING|(null)|gpu[01-02]\n").batch_host == "gpu01"


def test_parse_empty_and_malformed() -> None:
    with pytest.raises(SlurmJobUnknown):
        parse_squeue("42", "\n")
    with pytest.raises(SlurmQueryError, match="squeue gave"):
        parse_squeue("42", "alice RUNNING node2\n")
    with pytest.raises(SlurmQueryError, match="node list"):
        parse_squeue("42", "alice|RUNNING|node2|node[2-\n")


@pytest.fixture
def squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Install a fake squeue printing `out` to stdout and `errtext` to stderr, exiting
    `rc`; it records its argv."""
    script = tmp_path / "squeue"
    calls = tmp_path / "calls"

    def make(out: str = "", errtext: str = "", rc: int = 0, delay: float = 0) -> Path:
        script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nsleep {delay}\n"
                          f"printf '%s' '{out}'\nprintf '%s' '{errtext}' >&2\nexit {rc}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        return calls

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return make


def test_one_squeue_call_with_the_fixed_format(squeue: Callable[..., Path]) -> None:
    calls = squeue(out="alice|RUNNING|node2|node[1-2]\n")
    assert query_job("42").batch_host == "node2"
    assert calls.read_text().splitlines() == [f"-h -j 42 -o {SQUEUE_FORMAT}"]


def test_unknown_job_and_squeue_failures(squeue: Callable[..., Path]) -> None:
    squeue(errtext="slurm_load_jobs error: Invalid job id specified\n", rc=1)
    with pytest.raises(SlurmJobUnknown):
        query_job("42")
    squeue(errtext="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    with pytest.raises(SlurmQueryError, match="Unable to contact slurm controller"):
        query_job("42")
    squeue(delay=5)
    with pytest.raises(SlurmQueryError, match="did not answer within 0.3 s"):
        query_job("42", timeout=0.3)
    with pytest.raises(SlurmQueryError, match="not found"):
        query_job("42", squeue="/nonexistent/squeue")
    with pytest.raises(SlurmJobUnknown):
        query_job("42; rm -rf /")    # never reaches squeue


def test_ssh_to_job_goes_to_the_batch_host(squeue: Callable[..., Path]) -> None:
    squeue(out="alice|RUNNING|node3|node[3-4]\n")
    assert slurm_node("42", auto_retry=False) == "node3"


def test_ssh_to_job_errors_are_one_line(squeue: Callable[..., Path]) -> None:
    squeue(errtext="slurm_load_jobs error: Invalid job id specified\n", rc=1)
    with pytest.raises(CliError, match="no job 42 in Slurm") as e:
        slurm_node("42", auto_retry=False)
    assert e.value.category == "Not found"
    squeue(out="alice|PENDING|n/a|\n")
    with pytest.raises(CliError, match="job 42 is PENDING in Slurm$"):
        slurm_node("42", auto_retry=False)
    with pytest.raises(CliError, match="slurmctld is not polled"):
        slurm_node("42", auto_retry=True)
    squeue(out="alice|COMPLETING|node3|node3\n")
    with pytest.raises(CliError, match="job 42 is COMPLETING in Slurm$"):
        slurm_node("42", auto_retry=True)
    squeue(errtext="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    with pytest.raises(CliError, match="Unable to contact") as e:
        slurm_node("42", auto_retry=False)
    assert e.value.category == "Slurm"
