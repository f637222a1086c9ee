"""ssh-to-job into a Slurm job, next to Slurm's own way in: ``srun --jobid J --overlap``.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_slurm_ssh_to_job.py [--rounds 40] [--json FILE]

It brings up its own 2-node lab with real Slurm (instance `cidlab-bs`, torn down at the
end, also on failure): the agents run `backend = "slurm"`, and alice has one batch job on
node2 (``sbatch -w node2 --wrap 'sleep 100000'``). Every command runs as alice on node1 --
a node outside the job, as a login node is -- and is timed there by a driver process
(cmd_driver.py), interleaved command by command in a shuffled order each round, after one
warm-up of each:

    ssh-to-job          ssh-to-job J true             (squeue for the BatchHost, then the
                                                       session in the extern step: the target)
    ssh-to-job -name    ssh-to-job -name node2 J true (no squeue; information)
    srun --overlap      srun --jobid J --overlap true (a new step of the job: Slurm's way)
    ssh :2201           ssh -p 2201 node2 true        (plain ssh to the job's node, the
                                                       lab's stock sshd: the floor of any
                                                       ssh-based session; information)

Target (issue 11): ssh-to-job <= srun --overlap, as the ratio of medians (and the paired
median difference, round by round, is printed too). Exit status 0 when every command
succeeded and the target holds; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import lab as lab_mod
from tests.benchmarks.bench_logins import pct
from tests.benchmarks.bench_slurm_logins import sbatch
from tests.benchmarks.bench_ssh_to_job import Driver
from tests.benchmarks.interleave import interleaved

REPO = Path(__file__).resolve().parents[2]
USER = "alice"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="commands per variant (>= 40)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lab", default="cidlab-bs", help="the lab's instance name")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lab = lab_mod.Lab(f"/run/callerid-lab-bench-{args.lab}", nodes=2, venv=REPO / ".venv",
                      name=args.lab)
    t_start = time.monotonic()
    failures: dict[str, list[str]] = {}
    times: dict[str, list[float]] = {}
    driver: Driver | None = None
    try:
        lab.up(agents=True, slurm=True)
        job = str(sbatch(lab, USER, "node2"))
        stj = lab.venv_bin("ssh-to-job")
        variants = {
            "ssh-to-job": [stj, job, "true"],
            "ssh-to-job -name": [stj, "-name", "node2", job, "true"],
            "srun --overlap": ["srun", "--jobid", job, "--overlap", "true"],
            "ssh :2201": ["ssh", "-p", "2201", "node2", "true"],
        }
        failures = {v: [] for v in variants}
        driver = Driver(lab, "node1", Path("/tmp"))

        def run(variant: str) -> float:
            assert driver is not None
            rc, ms, err = driver.run(variants[variant])
            if rc != 0:
                failures[variant].append(f"rc {rc}: {err}")
            return ms

        times = interleaved(list(variants), args.rounds, rng, run)
    finally:
        if driver is not None:
            driver.close()
        lab.down()

    def paired(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))

    print("\ncallerid-adopt: a command in a running Slurm job, from a node outside it (node1 "
          "-> the job on node2)")
    print(f"{args.rounds} commands per variant, interleaved; milliseconds\n")
    print(f"{'variant':<20}{'n':>4}{'fail':>6}{'p50':>9}{'p90':>9}{'min':>9}"
          f"{'over srun (paired)':>21}")
    for v, ts in times.items():
        print(f"{v:<20}{len(ts):>4}{len(failures[v]):>6}{statistics.median(ts):>9.1f}"
              f"{pct(ts, 0.9):>9.1f}{min(ts):>9.1f}{paired(v, 'srun --overlap'):>+21.1f}")
    for v, errs in failures.items():
        for e in errs[:3]:
            print(f"  {v} failed: {e}")
    ratio = statistics.median(times["ssh-to-job"]) / statistics.median(times["srun --overlap"])
    passed = ratio <= 1.0
    ok = passed and not any(failures.values())
    print(f"\nssh-to-job / srun --overlap = {ratio:.2f} (ratio of medians); target <= 1: "
          f"{'PASS' if passed else 'FAIL'}")
    print(f"{'ALL TARGETS PASS' if ok else 'SOME TARGETS FAIL'}; "
          f"runtime {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"times": times, "ratio": ratio}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
