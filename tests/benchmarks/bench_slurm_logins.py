"""Slurm login benchmark: pam_adopt with the agents' Slurm backend next to pam_slurm_adopt.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_slurm_logins.py [--rounds 40] [--json FILE]

It brings up its own 2-node lab with real Slurm (instance `cidlab-bs`, torn down at the
end): the agents run `backend = "slurm"`. alice has one Slurm job on node1 and node2 (a1);
bob has two (b1, then b2). Every login is `ssh -p PORT node2 true`, started by a driver
process (login_driver.py) inside an `srun --overlap` step of alice's a1 or bob's b2 on
node1. The variants run interleaved login by login, in a shuffled order each round; the
port-22 sshd's account stack is switched between the two modules before each of its logins
(PAM reads the file at every login):

    none                  alice, port 2201 (no module)
    noop                  alice, port 2202 (a no-op pam_python module)
    pam_slurm_adopt 1 job alice, port 22, pam_slurm_adopt (adopts without an RPC)
    pam_adopt 1 job       alice, port 22, pam_adopt (the agent adopts through slurmstepd)
    pam_slurm_adopt 2 jobs  bob, port 22, pam_slurm_adopt (RPC to node1's slurmd)
    pam_adopt 2 jobs        bob, port 22, pam_adopt (CallerId to node1's agent)

Target (issue 11): pam_adopt <= pam_slurm_adopt + the no-op module's cost (noop - none),
both measured in this run, with one job and with two; paired medians per round. The
agent's login watch is off unless --login-watch: it would warm up pam_slurm_adopt's
logins too (same PAM service), which a pam_slurm_adopt site never gets.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lab as lab_mod
from tests.benchmarks.bench_logins import pct
from tests.benchmarks.interleave import driver_login, interleaved

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("login_driver.py")

VARIANTS = {  # name -> (driver, port, module on port 22)
    "none": ("alice", 2201, ""),
    "noop": ("alice", 2202, ""),
    "pam_slurm_adopt 1 job": ("alice", 22, "slurm"),
    "pam_adopt 1 job": ("alice", 22, "adopt"),
    "pam_slurm_adopt 2 jobs": ("bob", 22, "slurm"),
    "pam_adopt 2 jobs": ("bob", 22, "adopt"),
}
PAIRS = {"1 job": ("pam_slurm_adopt 1 job", "pam_adopt 1 job"),
         "2 jobs": ("pam_slurm_adopt 2 jobs", "pam_adopt 2 jobs")}


def sbatch(lab: lab_mod.Lab, user: str, nodes: str = "node1,node2") -> int:
    """A sleeping batch job of `user` on `nodes`, once it runs."""
    out = lab.run("node1", ["sbatch", "--parsable", "-w", nodes, "-o", "/dev/null",
                            "-J", "bench", "--wrap", "sleep 100000"], user=user,
                  cwd="/tmp").stdout
    job = int(out.strip().split(";")[0])
    deadline = time.monotonic() + 60
    while lab.run("node1", ["squeue", "-h", "-j", str(job), "-o", "%T"],
                  check=False).stdout.strip() != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job} of {user} did not start")
        time.sleep(0.1)
    return job


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="logins per variant (>= 40)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lab", default="cidlab-bs", help="the lab's instance name")
    ap.add_argument("--login-watch", action="store_true",
                    help="keep the agent's login watch (login_services): it pre-pays the "
                         "kernel's cgroup toll for every login of the service, "
                         "pam_slurm_adopt's too, which no pam_slurm_adopt site has")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lab = lab_mod.Lab(f"/run/callerid-lab-bench-{args.lab}", nodes=2, venv=REPO / ".venv",
                      name=args.lab)
    drivers: dict[str, subprocess.Popen[str]] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failures: dict[str, int] = {v: 0 for v in VARIANTS}
    t_start = time.monotonic()
    jobs: dict[str, int] = {}
    try:
        lab.up(agents=True, slurm=True)
        if not args.login_watch:
            # Both modules run under the same PAM service, so the agent's watch of its file
            # would warm up pam_slurm_adopt's logins too. Without it, pam_adopt keeps only
            # its own early connection to the agent (pam/pam_adopt.py).
            conf = lab.node_dir("node2") / "etc" / "agent.toml"
            text = conf.read_text()
            conf.write_text("\n".join("login_services = []" if line.startswith(
                "login_services") else line for line in text.splitlines()) + "\n")
            lab.agent_stop("node2")
            lab.agent_start("node2")
        jobs["a1"] = sbatch(lab, "alice")
        jobs["b1"] = sbatch(lab, "bob")
        time.sleep(1.1)   # b2 strictly the newest
        jobs["b2"] = sbatch(lab, "bob")
        for user, job in (("alice", jobs["a1"]), ("bob", jobs["b2"])):
            drivers[user] = lab.popen(
                "node1", ["srun", "--jobid", str(job), "--overlap", "-w", "node1", "-N1",
                          "-n1", "/usr/bin/python3", "-u", str(DRIVER)],
                user=user, cwd="/tmp", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True)
        module = ""

        def login(variant: str) -> float:
            nonlocal module
            user, port, want = VARIANTS[variant]
            if want and want != module:
                lab.set_pam_module("node2", want)
                module = want
            ok, ms = driver_login(drivers[user], port)
            failures[variant] += not ok
            return ms

        times = interleaved(list(VARIANTS), args.rounds, rng, login)
    finally:
        for d in drivers.values():
            if d.stdin:
                d.stdin.close()
            try:
                d.wait(timeout=30)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
        lab.down()

    def paired(a: str, b: str) -> float:
        return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))

    noop_cost = paired("noop", "none")
    print("\ncallerid-adopt Slurm login benchmark: `ssh -p PORT node2 true` from inside a "
          "Slurm job on node1 (srun --overlap)")
    print(f"{args.rounds} logins per variant, interleaved login by login; milliseconds; "
          f"the agent's login watch {'on' if args.login_watch else 'off'}\n")
    print(f"{'variant':<24}{'n':>4}{'fail':>6}{'p50':>9}{'p90':>9}{'over none (paired)':>21}")
    for v, ts in times.items():
        print(f"{v:<24}{len(ts):>4}{failures[v]:>6}{statistics.median(ts):>9.1f}"
              f"{pct(ts, 0.9):>9.1f}"
              f"{paired(v, 'none'):>+21.1f}")
    ok = not any(failures.values())
    print(f"\nthe no-op pam_python module costs {noop_cost:+.1f} ms over none (this run)")
    rows = {}
    for name, (slurm, adopt) in PAIRS.items():
        over = paired(adopt, slurm)
        passed = over <= noop_cost
        ok &= passed
        rows[name] = {"pam_adopt_over_pam_slurm_adopt": over, "noop_cost": noop_cost}
        print(f"{name}: pam_adopt - pam_slurm_adopt = {over:+.1f} ms (paired median); target "
              f"<= the no-op module's {noop_cost:+.1f} ms: {'PASS' if passed else 'FAIL'}")
    print(f"\n{'ALL TARGETS PASS' if ok else 'SOME TARGETS FAIL'}; "
          f"runtime {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"times": times, "pairs": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
