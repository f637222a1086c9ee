"""Parity with pam_slurm_adopt on real Slurm (issue 11): every scenario runs twice on the
same jobs, once with pam_slurm_adopt and once with pam_adopt + the agents' Slurm backend
as the last account module of node2's sshd, and the outcomes are printed side by side.

An outcome is where the login landed, or how it was refused:
"job A" / "job B" (the job's extern step, from /proc/self/cgroup in the session),
"no job" (admitted, not adopted), "denied: no jobs" (the module's sentence), or
"denied (rc N)"; in the accounting row, "extern step +CPU" when sstat shows the login's
CPU in the job's extern step. They must be equal except where DIFFERENCES says why
pam_adopt's is better (deploy/slurm/README.md has the same table).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import lab as lab_mod
from tests.integration.slurm import burning_session, sbatch_sleep, scancel, slurm_lab, step_cpu

pytestmark = pytest.mark.root

MODULES = ("slurm", "adopt")     # pam_slurm_adopt, pam_adopt
SLURMD_PORT, AGENT_PORT = 6818, 411
#: CPU seconds the accounting test's login burns (sstat shows whole seconds, truncated).
BURN_S = 2.5

#: scenario -> (pam_slurm_adopt's outcome, pam_adopt's, why), where they differ by design.
DIFFERENCES: dict[str, tuple[str, str, str]] = {
    "alice, two jobs, ssh from inside A (IPv6)": (
        "job B", "job A",
        "Slurm 22.05's caller-ID RPC has no IPv6: pam_slurm_adopt falls back to newest"),
}


class Table:
    """The outcomes, printed at the end of the module."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, scenario: str, outcomes: dict[str, str], note: str = "") -> None:
        self.rows.append((scenario, outcomes["slurm"], outcomes["adopt"], note))

    def text(self) -> str:
        lines = [f"{'scenario':48} {'pam_slurm_adopt':22} {'pam_adopt + Slurm backend':26} note"]
        lines += [f"{s:48} {a:22} {b:26} {n}" for s, a, b, n in self.rows]
        return "\n".join(lines)


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[Table]:
    t = Table()
    yield t
    if not t.rows:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n" + t.text())
        return
    with capture.global_and_fixture_disabled():   # shown whatever -s says
        print("\n" + t.text())


@pytest.fixture(scope="module")
def lab() -> Iterator[lab_mod.Lab]:
    """Slurm and the agents (backend = "slurm")."""
    yield from slurm_lab()


@pytest.fixture(scope="module")
def ab(lab: lab_mod.Lab) -> Iterator[dict[str, int]]:
    jobs = {"A": sbatch_sleep(lab, "alice", "node1,node2")}
    time.sleep(1.1)   # B's directories strictly newer (mtime, ctime in whole seconds)
    jobs["B"] = sbatch_sleep(lab, "alice", "node1,node2")
    yield jobs
    for job in jobs.values():
        scancel(lab, job)


def outcome(r: subprocess.CompletedProcess[str], jobs: dict[str, int]) -> str:
    if r.returncode != 0:
        if "you have no active jobs on this node" in r.stderr:
            return "denied: no jobs"
        return f"denied (rc {r.returncode})"
    names = {f"job_{job}": name for name, job in jobs.items()}
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] == "freezer":
            for part in parts[2].split("/"):
                if part in names:
                    return f"job {names[part]}"
            return "no job"
    return f"no cgroup line: {r.stdout[:80]!r}"


def both(lab: lab_mod.Lab, login: Callable[[], subprocess.CompletedProcess[str]],
         jobs: dict[str, int], options: tuple[str, ...] = ()) -> dict[str, str]:
    """The login's outcome under each module; node2's stack back to pam_adopt after."""
    out = {}
    try:
        for module in MODULES:
            lab.set_pam_module("node2", module, list(options))
            out[module] = outcome(login(), jobs)
    finally:
        lab.set_pam_module("node2", "adopt")
    return out


CAT = ["cat", "/proc/self/cgroup"]


def ssh(lab: lab_mod.Lab, user: str, *, family: int = 4, inside: int | None = None,
        before: str = "") -> Callable[[], subprocess.CompletedProcess[str]]:
    """`ssh node2 cat /proc/self/cgroup` from node1 as `user`: plain, or from a step of
    job `inside` (srun --overlap), after running `before` there."""
    argv = lab.ssh_argv("node2", CAT, family=family)
    if inside is not None:
        script = f"{before}exec {' '.join(argv)}"
        argv = ["srun", "--jobid", str(inside), "--overlap", "-w", "node1", "-N1", "-n1",
                "sh", "-c", script]
    return lambda: lab.run("node1", argv, user=user, check=False, cwd="/tmp", timeout=120)


def check(table: Table, scenario: str, got: dict[str, str]) -> None:
    want = DIFFERENCES.get(scenario)
    table.add(scenario, got, want[2] if want else "")
    if want:
        assert (got["slurm"], got["adopt"]) == want[:2], got
    else:
        assert got["slurm"] == got["adopt"], got


def test_one_job(lab: lab_mod.Lab, table: Table) -> None:
    job = sbatch_sleep(lab, "bob", "node2")
    try:
        got = both(lab, ssh(lab, "bob"), {"C": job})
    finally:
        scancel(lab, job)
    assert got["adopt"] == "job C"
    check(table, "bob, one job (C) on node2", got)


def test_login_is_accounted_in_the_extern_step(lab: lab_mod.Lab, table: Table) -> None:
    """The lab runs jobacct_gather/linux: the stepd accounts for what it adopted. bob's
    login into his job burns BURN_S s of CPU and stays; sstat (the stepd's figures, no
    slurmdbd here) then shows the job's extern step grown by the burn's whole seconds (it
    counts the adopted sshd and all it started). The control: alice's job K on the same node, with
    no login, keeps its extern step at 0 s through both logins."""
    control = sbatch_sleep(lab, "alice", "node2")
    got, figures = {}, []
    try:
        for module in MODULES:
            lab.set_pam_module("node2", module)
            job = sbatch_sleep(lab, "bob", "node2")
            try:
                before = step_cpu(lab, job, "bob")["extern"]
                p, burned = burning_session(lab, "bob", BURN_S)
                try:
                    after = step_cpu(lab, job, "bob")["extern"]
                finally:
                    p.kill()
                    p.wait()
            finally:
                scancel(lab, job)
            # The burn's whole seconds (2 of 2.5): sstat truncates to whole seconds, and
            # /proc's utime + stime, which the stepd sums, to 10 ms ticks.
            want = int(burned - 0.05)
            assert want >= 0.75 * BURN_S, burned
            got[module] = ("extern step +CPU" if after - before >= want
                           else f"not accounted ({before} -> {after} s)")
            figures.append(f"{before}->{after} s")
        kept = step_cpu(lab, control, "alice")
    finally:
        scancel(lab, control)
        lab.set_pam_module("node2", "adopt")
    assert kept["extern"] == 0, kept
    assert got["adopt"] == "extern step +CPU", got
    check(table, f"bob, one job, login burns {BURN_S} s CPU (sstat)", got)
    table.rows[-1] = (*table.rows[-1][:3], f"extern {' / '.join(figures)}; no-login job "
                      f"{kept['extern']} s")


def test_no_job(lab: lab_mod.Lab, ab: dict[str, int], table: Table) -> None:
    got = both(lab, ssh(lab, "bob"), ab)
    assert got["adopt"] == "denied: no jobs"
    check(table, "bob, no job on node2", got)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("inside", ["A", "B"])
def test_two_jobs_from_inside_one(lab: lab_mod.Lab, ab: dict[str, int], table: Table,
                                  inside: str, family: int) -> None:
    got = both(lab, ssh(lab, "alice", family=family, inside=ab[inside]), ab)
    assert got["adopt"] == f"job {inside}"
    check(table, f"alice, two jobs, ssh from inside {inside} (IPv{family})", got)


def test_two_jobs_from_outside_any_job(lab: lab_mod.Lab, ab: dict[str, int],
                                       table: Table) -> None:
    got = both(lab, ssh(lab, "alice"), ab)
    assert got["adopt"] in ("job A", "job B")
    check(table, "alice, two jobs, ssh from outside any job", got)


def test_only_another_users_job(lab: lab_mod.Lab, ab: dict[str, int], table: Table) -> None:
    got = both(lab, ssh(lab, "bob"), ab)
    check(table, "bob, only alice's jobs on node2", got)


def test_root_is_ignored(lab: lab_mod.Lab, ab: dict[str, int], table: Table) -> None:
    got = both(lab, ssh(lab, "root"), ab)
    assert got["adopt"] == "no job"
    check(table, "root", got)


def test_another_service_is_ignored(lab: lab_mod.Lab, ab: dict[str, int],
                                    table: Table) -> None:
    got = both(lab, ssh(lab, "bob"), ab, options=("service=some-other-service",))
    assert got["adopt"] == "no job"
    check(table, "bob, module configured for another service", got)


def test_source_black_holed(lab: lab_mod.Lab, ab: dict[str, int], table: Table) -> None:
    """The ssh starts inside A on node1 3 s after srun launched its step; meanwhile
    node1's slurmd and agent ports are black-holed: neither module can ask node1, each
    ends on its own timeout and applies action_unknown=newest."""
    times: dict[str, float] = {}

    def login() -> subprocess.CompletedProcess[str]:
        run = ssh(lab, "alice", inside=ab["A"], before="sleep 3; ")
        module = "slurm" if "pam_slurm_adopt" in (
            lab.node_dir("node2") / "pam.d" / lab.pam_service("node2")).read_text() else "adopt"
        holes: list[int] = []
        result: list[subprocess.CompletedProcess[str]] = []
        t = threading.Thread(target=lambda: result.append(run()))
        t0 = time.monotonic()
        t.start()
        time.sleep(1.5)          # the step is launched; the ssh is 1.5 s away
        try:
            for port in (SLURMD_PORT, AGENT_PORT):
                lab.blackhole("node1", port)
                holes.append(port)
            t.join(timeout=150)
        finally:
            for port in holes:
                lab.blackhole("node1", port, on=False)
        times[module] = time.monotonic() - t0 - 3
        return result[0]

    got = both(lab, login, ab)
    assert got["adopt"] in ("job A", "job B")
    assert times["adopt"] < 5 + 2, times   # the module's timeout, and ssh's own time
    check(table, "alice, two jobs, source node black-holed", got)
    table.rows[-1] = (*table.rows[-1][:3],
                      f"login took {times['slurm']:.1f} s / {times['adopt']:.1f} s")
