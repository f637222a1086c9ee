"""Slurm in the lab, for the integration tests: submit, wait, cancel, held ssh sessions
and a step's CPU from sstat (tests/integration/test_slurm_lab.py, test_slurm_adopt.py,
test_slurm_parity.py)."""

from __future__ import annotations

import pwd
import subprocess
import threading
import time
from collections.abc import Iterator

import lab as lab_mod
from tests.integration.conftest import it_lab

#: Bounds of the waits below (a loaded 2-core machine; each is normally well under 1 s).
RUNNING_TIMEOUT = 30.0
KILL_TIMEOUT = 20.0


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def squeue_state(the_lab: lab_mod.Lab, job: int) -> str:
    """The job's state (RUNNING, PENDING, ...; "" once it is gone from squeue)."""
    r = the_lab.run("node1", ["squeue", "-h", "-t", "all", "-j", str(job), "-o", "%T"],
                    check=False)
    return r.stdout.strip()


def sbatch_sleep(the_lab: lab_mod.Lab, user: str, node: str, *, cwd: str = "/tmp",
                 env: dict[str, str] | None = None) -> int:
    """``sbatch -w NODE --wrap 'sleep 300'`` as ``user`` from node1 (in `cwd`, with `env`
    added to the submitting environment, which sbatch exports to the job); the job id once
    the job is RUNNING (bounded wait)."""
    out = the_lab.run("node1", ["sbatch", "--parsable", "-w", node, "-o", "/dev/null",
                                "-J", "lab-test", "--wrap", "sleep 300"],
                      user=user, cwd=cwd, env=env).stdout
    job = int(out.strip().split(";")[0])
    deadline = time.monotonic() + RUNNING_TIMEOUT
    state = ""
    while state != "RUNNING":
        state = squeue_state(the_lab, job)
        if time.monotonic() > deadline or state in ("FAILED", "CANCELLED", "COMPLETED"):
            raise AssertionError(
                f"job {job} not RUNNING after {RUNNING_TIMEOUT:.0f} s (state {state!r}); "
                f"slurmctld.log:\n{the_lab.slurm_log()[-3000:]}\n"
                f"slurmd-{node}.log:\n{the_lab.slurm_log(node)[-3000:]}")
        time.sleep(0.1)
    return job


def scancel(the_lab: lab_mod.Lab, job: int, user: str = "root") -> None:
    the_lab.run("node1", ["scancel", str(job)], user=user, check=False)


def held_session(the_lab: lab_mod.Lab, user: str) -> tuple[subprocess.Popen[str], int]:
    """``ssh node2 'echo $$; exec sleep 300'`` from node1 as ``user``: the ssh client and
    the pid of the remote session's process (the shell that became sleep)."""
    p, line = _held(the_lab, user, "echo $$; exec sleep 300")
    if not line.strip().isdigit():
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"ssh session did not print its pid: {line!r}, stderr {err!r}")
    return p, int(line)


def burning_session(the_lab: lab_mod.Lab, user: str,
                    seconds: float) -> tuple[subprocess.Popen[str], float]:
    """An ssh session from node1 to node2 as ``user`` whose process burns ``seconds`` of
    CPU in a busy loop, then stays alive (slurmstepd's accounting of a running step
    counts live processes only): the ssh client and the CPU time the process reports
    (user + system, a little over ``seconds``), once the loop is done."""
    remote = ("exec python3 -c 'import time\n"
              "t = time.process_time()\n"
              f"while time.process_time() - t < {seconds}: pass\n"
              "print(time.process_time(), flush=True)\n"
              "time.sleep(300)'")
    p, line = _held(the_lab, user, remote, timeout=30 + 4 * seconds)
    try:
        return p, float(line)
    except ValueError:
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"ssh session did not print its CPU time: {line!r}, "
                             f"stderr {err!r}") from None


def _held(the_lab: lab_mod.Lab, user: str, remote: str,
          timeout: float = 30) -> tuple[subprocess.Popen[str], str]:
    """``ssh node2 REMOTE`` from node1 as ``user``, and the first line it prints ("" if
    none within ``timeout`` seconds); the session goes on."""
    p = the_lab.popen("node1", the_lab.ssh_argv("node2", remote),
                      user=user, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(p.stdout.readline() if p.stdout
                                                         else ""))
    reader.start()
    reader.join(timeout=timeout)
    return p, (line[0].strip() if line else "")


def step_cpu(the_lab: lab_mod.Lab, job: int, user: str = "root") -> dict[str, int]:
    """Each running step of ``job`` -> its CPU seconds so far, as ``sstat`` (run by
    ``user``) reports it from the stepds: the ``cpu=`` of TRESUsageInTot, which sums the
    step's tracked processes on each node (whole seconds, truncated). Steps by sstat's
    name: "extern", "batch", "0", ... (The extern step's AveCPU is the same figure on one
    node; its MinCPU is the step's idle "sleep" task's, 0; 22.05's sstat has no TotalCPU.)
    Only live processes count: once an adopted session ends, it leaves sstat's figures."""
    r = the_lab.run("node1", ["sstat", "-a", "-j", str(job), "-n", "-P",
                              "--format=JobID,TRESUsageInTot"], user=user, check=False)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        step, _, tres = line.partition("|")
        cpu = dict(kv.split("=", 1) for kv in tres.split(",") if "=" in kv).get("cpu")
        if cpu is not None:
            out[step.split(".", 1)[-1]] = _seconds(cpu)
    assert out, f"sstat shows no step's CPU (JobAcctGatherType=jobacct_gather/none?): " \
        f"{r.stdout!r}"
    return out


def _seconds(elapsed: str) -> int:
    """Slurm's elapsed time ``[D-]HH:MM:SS`` (also ``MM:SS``) in seconds: "1-00:00:02" is
    86402."""
    days, _, hms = elapsed.rpartition("-")
    secs = 0
    for part in hms.split(":"):
        secs = secs * 60 + int(float(part))
    return secs + 86400 * int(days or 0)


def slurm_lab(pam: str = "", job_container: bool = False) -> Iterator[lab_mod.Lab]:
    """A module's lab (a fixture's body): the integration lab's name and dir, with Slurm
    and the agents (`backend = "slurm"`), torn down after; `pam`: the module every node's
    port-22 sshd gets ("adopt", "slurm"), else the lab's default; `job_container`: every
    job gets a private /tmp (job_container/tmpfs)."""
    the_lab = it_lab()
    the_lab.slurm_job_container = job_container
    try:
        the_lab.up(agents=True, slurm=True)
        for node in the_lab.nodes if pam else []:
            the_lab.set_pam_module(node, pam)
        yield the_lab
    finally:
        the_lab.down()
