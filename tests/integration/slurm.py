"""Slurm in the lab, for the integration tests: submit, wait, cancel, and a held ssh
session (tests/integration/test_slurm_lab.py, test_slurm_adopt.py)."""

from __future__ import annotations

import pwd
import subprocess
import threading
import time

import lab as lab_mod

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
    p = the_lab.popen("node1", the_lab.ssh_argv("node2", "echo $$; exec sleep 300"),
                      user=user, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(p.stdout.readline() if p.stdout
                                                         else ""))
    reader.start()
    reader.join(timeout=30)
    if not line or not line[0].strip().isdigit():
        p.kill()
        _, err = p.communicate(timeout=10)
        raise AssertionError(f"ssh session did not print its pid: {line!r}, stderr {err!r}")
    return p, int(line[0])
