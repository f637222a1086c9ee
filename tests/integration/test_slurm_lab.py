"""Real Slurm in the lab (``Lab.up(slurm=True)``, deploy/lab/lab/slurm.py) with
pam_slurm_adopt on the port-22 sshd: the reference that pam_adopt's Slurm backend is
measured against (issue 11).

This module runs its own lab (same instance name as the other modules, one after the
other) with Slurm and without agents: slurmctld in the head namespace, ``slurmd -N nodeN``
in each node. alice submits ``sleep 300`` to node2 with sbatch; with pam_slurm_adopt in
node2's account stack, her ssh from node1 lands in the job's extern step
(``freezer:/slurm_node2/uid_<uid>/job_<id>/step_extern`` inside the node, under the lab's
own cgroup subtree on the host), ``scontrol listpids`` lists it and ``scancel`` kills it;
bob, with no job there, is denied. The last test takes the lab down and checks that no
Slurm process, cgroup or file is left outside the lab's dir.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lab as lab_mod
from tests.integration.conftest import it_lab
from tests.integration.helpers import process_alive
from tests.integration.slurm import (
    KILL_TIMEOUT,
    held_session,
    sbatch_sleep,
    scancel,
    squeue_state,
    uid_of,
)

pytestmark = pytest.mark.root

DENY_NO_JOBS = "Access denied by pam_slurm_adopt: you have no active jobs on this node"
#: Where Debian's Slurm would put things on the host if the lab's config let it.
HOST_SLURM_PLACES = (Path("/etc/slurm"), Path("/var/log/slurm"), Path("/var/lib/slurm"),
                     Path("/var/spool"), Path("/run"), Path("/dev/shm"))


def _host_slurm_files(lab_dir: Path) -> dict[str, list[str]]:
    """What the host has under the places Slurm writes by default (names with "slurm"
    where the place is not Slurm's own), but the lab's own dir (its logs stay)."""
    out = {}
    for place in HOST_SLURM_PLACES:
        if not place.is_dir():
            continue
        if "slurm" in place.name:
            names = sorted(str(p.relative_to(place)) for p in place.rglob("*"))
        else:
            names = sorted(p.name for p in place.iterdir()
                           if "slurm" in p.name.lower() and p != lab_dir)
        out[str(place)] = names
    return out


def _slurm_cgroups_outside(the_lab: lab_mod.Lab) -> list[str]:
    """Cgroup dirs named slurm* anywhere in /sys/fs/cgroup but inside this lab's subtree
    (Slurm's own are slurm_<node>; memory is searched too: nothing may appear there)."""
    found = []
    root = Path("/sys/fs/cgroup")
    for dirpath, dirs, _ in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if len(rel) >= 2 and rel[1] == the_lab.name:
            dirs[:] = []  # the lab's own subtree: checked separately
            continue
        found += [os.path.join(dirpath, d) for d in dirs if d.startswith("slurm")]
    return found


@pytest.fixture(scope="module")
def host_before() -> dict[str, Any]:
    """The host's Slurm-related files and cgroups before this module's lab comes up."""
    the_lab = it_lab()
    return {"files": _host_slurm_files(the_lab.dir),
            "cgroups": _slurm_cgroups_outside(the_lab)}


@pytest.fixture(scope="module")
def lab(host_before: dict[str, Any]) -> Iterator[lab_mod.Lab]:
    """This module's lab: the integration lab's name and dir, with Slurm, no agents."""
    the_lab = it_lab()
    try:
        t0 = time.monotonic()
        the_lab.up(agents=False, slurm=True)
        print(f"lab with Slurm up in {time.monotonic() - t0:.2f} s")
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def job(lab: lab_mod.Lab) -> Iterator[int]:
    """alice's ``sleep 300`` running on node2, and pam_slurm_adopt in node2's sshd."""
    job = sbatch_sleep(lab, "alice", "node2")
    lab.set_pam_module("node2", "slurm")
    try:
        yield job
    finally:
        scancel(lab, job)
        lab.set_pam_module("node2", "adopt")


def test_slurm_is_up(lab: lab_mod.Lab) -> None:
    nodes = lab.run("node1", ["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
    assert sorted(line for line in nodes if line) == ["node1 idle", "node2 idle"]
    status = lab.status()
    assert status["slurm"]["slurmctld_pid"] is not None
    for node in lab.nodes:
        assert status["nodes"][node]["slurmd_pid"] is not None
        # The nodes see the lab's config at /etc/slurm; the host's /etc/slurm has none.
        conf = lab.run(node, ["cat", "/etc/slurm/slurm.conf"]).stdout
        assert f"ClusterName={lab.name}" in conf and "ProctrackType=proctrack/cgroup" in conf
    assert not Path("/etc/slurm/slurm.conf").exists()
    cgconf = (lab.slurm_dir / "etc" / "cgroup.conf").read_text()
    assert "CgroupPlugin=cgroup/v1" in cgconf and "ConstrainRAMSpace=no" in cgconf


def test_ssh_lands_in_the_extern_step(lab: lab_mod.Lab, job: int) -> None:
    r = lab.run("node1", lab.ssh_argv("node2", ["cat", "/proc/self/cgroup"]), user="alice",
                check=False)
    assert r.returncode == 0, r.stderr
    freezer = [line.split(":", 2)[2] for line in r.stdout.splitlines()
               if line.split(":")[1] == "freezer"]
    assert freezer == [f"/slurm_node2/uid_{uid_of('alice')}/job_{job}/step_extern"], r.stdout


def test_listpids_and_scancel(lab: lab_mod.Lab, job: int) -> None:
    p, pid = held_session(lab, "alice")
    try:
        # On the host the same cgroup sits inside the lab's own subtree.
        host = [line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text()
                .splitlines() if line.split(":")[1] == "freezer"]
        assert host == [f"/{lab.name}/node2/slurm_node2/uid_{uid_of('alice')}/job_{job}"
                        "/step_extern"]
        listed = lab.run("node2", ["scontrol", "listpids", str(job)]).stdout
        rows = [line.split() for line in listed.splitlines()[1:]]
        assert [str(pid), str(job), "extern", "-", "-"] in rows, listed
        scancel(lab, job, user="alice")
        deadline = time.monotonic() + KILL_TIMEOUT
        while process_alive(pid):
            assert time.monotonic() < deadline, f"adopted pid {pid} outlived scancel"
            time.sleep(0.02)
        p.wait(timeout=KILL_TIMEOUT)
        assert squeue_state(lab, job) in ("CANCELLED", "COMPLETING", "")
    finally:
        p.kill()
        p.wait()


def test_user_without_a_job_is_denied(lab: lab_mod.Lab, job: int) -> None:
    r = lab.run("node1", lab.ssh_argv("node2", ["true"]), user="bob", check=False)
    assert r.returncode == 255
    assert DENY_NO_JOBS in r.stderr
    # The same login under pam_adopt (no agents in this lab) is not pam_slurm_adopt's.
    lab.set_pam_module("node2", "adopt")
    r = lab.run("node1", lab.ssh_argv("node2", ["true"]), user="bob", check=False)
    assert r.returncode == 255 and DENY_NO_JOBS not in r.stderr


def test_down_leaves_nothing(lab: lab_mod.Lab, host_before: dict[str, Any]) -> None:
    # Runs last: a running job (stepds, its cgroups, an adopted session), then down.
    job = sbatch_sleep(lab, "alice", "node2")
    lab.set_pam_module("node2", "slurm")
    p, session = held_session(lab, "alice")
    daemons = [lab.slurm_pid(n) for n in ["head", *lab.nodes]]
    stepds = lab.slurm_stepd_pids()
    assert all(daemons) and len(stepds) >= 2, (daemons, stepds)
    job_cg = [lab.cgroup(h) / "node2" / "slurm_node2" for h in lab.hierarchies
              if h.name == "freezer"]
    assert job_cg and all(d.is_dir() for d in job_cg)
    lab.down()
    p.wait(timeout=10)
    pids = [pid for pid in [*daemons, *stepds, session] if pid]
    assert [pid for pid in pids if process_alive(pid)] == []
    assert not any(d.exists() for d in job_cg)
    assert not any(h.lab_root(lab.name).exists() for h in lab.hierarchies)
    assert _slurm_cgroups_outside(lab) == host_before["cgroups"]
    assert _host_slurm_files(lab.dir) == host_before["files"]
    assert not (lab.dir / "slurm").exists()
    assert {"slurmctld.log", "slurmd-node2.log"} <= set(os.listdir(lab.dir / "logs"))
    assert f"Launching batch job {job} " in lab.slurm_log("node2")
