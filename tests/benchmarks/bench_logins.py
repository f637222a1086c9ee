"""Login benchmark: what pam_adopt adds to an ssh login, next to a no-op PAM module.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_logins.py [--rounds 40] [--json FILE] [--lab NAME]

It brings up its own 2-node lab (instance `cidlab-bl`, dir /run/callerid-lab-bench-logins;
with `--lab NAME`, instance NAME in /run/callerid-lab-bench-logins-NAME, so that two runs
can share the machine; torn down at the end) whose node2 runs three sshd instances that
differ only in their PAM account stack:

- port 2201: no account module beyond Debian's (`none`),
- port 2202: a no-op pam_python module (`noop`: the cost of starting pam_python),
- port 22:   pam_adopt (`adopt`).

alice has one job on node2, bob has two; each has the same jobs on node1. Every login is
`ssh -p PORT node2 true` started from inside a job on node1 (alice's a1, bob's b2), timed
by a driver process in that job (login_driver.py). The four variants run interleaved
login by login, in a shuffled order each round (block-wise runs drift by +-20 ms here):

    none          alice, port 2201
    noop          alice, port 2202
    adopt, 1 job  alice, port 22: the agent adopts without any network call
    adopt, 2 jobs bob, port 22: the agent asks node1's agent (CallerId) which job it is

The table gives p50 / p90 / mean per variant and the cost over `noop`, as the median of
the per-round differences (paired, so drift cancels) and as the difference of medians.
The agent's own decision times come from its log lines ("admission: ... (X ms)").
Targets: adopt with one job <= noop + 10 ms, with two jobs <= noop + 15 ms.
For reference (LAB-NOTES, measured on these machines): a no-op pam_python module costs
+20 ms over none; Slurm's C pam_slurm_adopt +5 ms with one job, +25 ms with two (RPC).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lab as lab_mod
from tests.benchmarks.interleave import driver_login, interleaved

REPO = Path(__file__).resolve().parents[2]

VARIANTS = {  # name -> (driver, port)
    "none": ("alice", 2201),
    "noop": ("alice", 2202),
    "adopt, 1 job": ("alice", 22),
    "adopt, 2 jobs": ("bob", 22),
}
TARGETS = {"adopt, 1 job": 10.0, "adopt, 2 jobs": 15.0}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def adoptctl(lab: lab_mod.Lab, node: str, *argv: str) -> str:
    return str(lab.run(node, [lab.venv_bin("adoptctl"), *argv]).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="logins per variant (>= 40)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lab", default="cidlab-bl", help="the lab's instance name")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lab_dir = "/run/callerid-lab-bench-logins" + ("" if args.lab == "cidlab-bl"
                                                  else f"-{args.lab}")
    lab = lab_mod.Lab(lab_dir, nodes=2, venv=REPO / ".venv", name=args.lab)
    drivers: dict[str, subprocess.Popen[str]] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failures: dict[str, int] = {v: 0 for v in VARIANTS}
    t_start = time.monotonic()
    try:
        lab.up()
        lab.set_pam("node2", [])
        for node in ("node1", "node2"):
            for job, user in (("a1", "alice"), ("b1", "bob"), ("b2", "bob")):
                adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--",
                         "/bin/sleep", "1000000")
                time.sleep(0.01)
        for user, job in (("alice", "a1"), ("bob", "b2")):
            p = lab.popen("node1", ["/usr/bin/python3", "-u",
                                    str(Path(__file__).with_name("login_driver.py"))],
                          user=user, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            adoptctl(lab, "node1", "job", "attach", job, str(p.pid))
            drivers[user] = p

        def login(variant: str) -> float:
            user, port = VARIANTS[variant]
            ok, ms = driver_login(drivers[user], port)
            failures[variant] += not ok
            return ms

        times = interleaved(list(VARIANTS), args.rounds, rng, login)
        log = lab.agent_log("node2")
    finally:
        for d in drivers.values():
            if d.stdin:
                d.stdin.close()
            d.wait(timeout=30)
        lab.down()
    decisions: dict[str, list[float]] = {}
    for m in re.finditer(r"admission: .*?: ALLOW (one-job|caller-id) job \S+ \(([\d.]+) ms\)",
                         log):
        decisions.setdefault(m.group(1), []).append(float(m.group(2)))

    base = times["noop"]
    rows = []
    ok = True
    print("\ncallerid-adopt login benchmark: `ssh -p PORT node2 true` from inside a job on node1")
    print(f"{args.rounds} logins per variant, interleaved login by login; milliseconds\n")
    print(f"{'variant':<16}{'n':>4}{'fail':>6}{'p50':>9}{'p90':>9}{'mean':>9}"
          f"{'over noop (paired median)':>28}{'over noop (p50 diff)':>23}  target")
    for v, ts in times.items():
        paired = statistics.median(a - b for a, b in zip(ts, base, strict=True))
        diff = statistics.median(ts) - statistics.median(base)
        target = TARGETS.get(v)
        verdict = ""
        if target is not None:
            passed = paired <= target and failures[v] == 0
            ok &= passed
            verdict = f"<= +{target:g} ms: {'PASS' if passed else 'FAIL'}"
        rows.append({"variant": v, "n": len(ts), "failures": failures[v],
                     "p50": statistics.median(ts), "p90": pct(ts, 0.9),
                     "mean": statistics.fmean(ts), "over_noop_paired_median": paired,
                     "over_noop_p50_diff": diff})
        print(f"{v:<16}{len(ts):>4}{failures[v]:>6}{statistics.median(ts):>9.1f}"
              f"{pct(ts, 0.9):>9.1f}{statistics.fmean(ts):>9.1f}{paired:>+28.1f}{diff:>+23.1f}"
              f"  {verdict}")
    print("\nthe agent's own decision (node2, from its log), ms:")
    for reason, ds in sorted(decisions.items()):
        print(f"  {reason:<10} n={len(ds):<4} p50 {statistics.median(ds):.2f}  "
              f"p90 {pct(ds, 0.9):.2f}  max {max(ds):.2f}")
    print("\nreference (LAB-NOTES, same kind of machine): no-op pam_python +20 ms over none; "
          "pam_slurm_adopt +5 ms (1 job), +25 ms (2 jobs, RPC)")
    print(f"\n{'ALL TARGETS PASS' if ok else 'SOME TARGETS FAIL'}; "
          f"runtime {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "decisions": decisions}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
