"""Login burst benchmark: many ssh logins at once, both ways, each from inside its own job.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_login_burst.py [--per 25] [--rounds 3]

It brings up its own 2-node lab (instance `cidlab-bb`, dir /run/callerid-lab-bench-burst,
torn down at the end). alice has jobs A and B, bob C and D, on both nodes, so every login
needs a caller-ID call to the source node. A burst starts, on each node and in each job,
`--per` logins at once to the other node (`ssh NODE cat /proc/self/cgroup`): 8 x per
logins (200 with the default). Bursts against pam_adopt (port 22) and against the no-op
pam_python module (port 2202, the cost of pam_python alone, no adoption) alternate,
`--rounds` of each.

It prints, per variant, the burst's wall time and the failed logins; for pam_adopt also
the logins that did not land in their own job, and how long pam_adopt waited for the
agent's answer (its "answered in N ms" syslog lines), next to the module's `timeout=`
(5 s by default): the answer, not the login, is what must stay inside it. No target is
set by an issue; a login that fails or lands in another job is a failure of the run
(exit 1)."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lab as lab_mod
from tests.integration.helpers import adoptctl, login_burst

REPO = Path(__file__).resolve().parents[2]

JOBS = {"A": "alice", "B": "alice", "C": "bob", "D": "bob"}
VARIANTS = {"pam_adopt": 22, "no-op module": 2202}
LANDED = re.compile(r"^0::/callerid/job_([^/]+)/adopted$", re.M)
MODULE_TIMEOUT_MS = 5000  # pam_adopt's default timeout=


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def burst(lab: lab_mod.Lab, out: Path, port: int, per: int) -> tuple[float, int, int]:
    """One burst: (seconds, failed logins, logins that landed outside their job)."""
    elapsed, logins = login_burst(
        lab, out, JOBS, per, lambda dst: lab.ssh_argv(dst, ["cat", "/proc/self/cgroup"],
                                                      port=port), timeout=600)
    failed = sum("::" not in x.out for x in logins)
    wrong = 0
    if port == VARIANTS["pam_adopt"]:
        for x in logins:
            m = LANDED.search(x.out)
            wrong += "::" in x.out and (m is None or m.group(1) != x.job)
    return elapsed, failed, wrong


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per", type=int, default=25, help="logins per job and direction")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per variant")
    args = ap.parse_args()
    lab = lab_mod.Lab("/run/callerid-lab-bench-burst", nodes=2, venv=REPO / ".venv",
                      name="cidlab-bb")
    results: dict[str, list[tuple[float, int, int]]] = {v: [] for v in VARIANTS}
    answered: list[float] = []
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="callerid-bench-burst-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        lab.up()
        for node in lab.nodes:
            lab.set_pam(node, [])
            for job, user in JOBS.items():
                adoptctl(lab, node, "job", "run", "--id", job, "--user", user, "--",
                         "/bin/sleep", "1000000")
                time.sleep(0.01)
        for r in range(args.rounds):
            for variant, port in (VARIANTS.items() if r % 2 == 0
                                  else reversed(VARIANTS.items())):
                out = work / f"{r}-{port}"
                out.mkdir()
                out.chmod(0o755)
                before = len(lab.syslog())
                results[variant].append(burst(lab, out, port, args.per))
                if port == VARIANTS["pam_adopt"]:
                    answered += [float(ms) for ms in re.findall(
                        r"answered in (\d+) ms", lab.syslog()[before:])]
    finally:
        lab.down()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    logins = 8 * args.per
    ok = True
    print(f"\ncallerid-adopt login burst: {logins} ssh logins at once ({args.per} per job and "
          f"direction, 4 jobs, both ways), {args.rounds} bursts per variant, alternating\n")
    print(f"{'variant':<14}{'bursts':>7}{'s p50':>8}{'s max':>8}{'logins/s':>10}"
          f"{'failed':>8}{'wrong job':>11}")
    for variant, rs in results.items():
        secs = [r[0] for r in rs]
        failed, wrong = sum(r[1] for r in rs), sum(r[2] for r in rs)
        ok &= failed == 0 and wrong == 0
        wrong_text = str(wrong) if variant == "pam_adopt" else "-"
        print(f"{variant:<14}{len(rs):>7}{statistics.median(secs):>8.1f}{max(secs):>8.1f}"
              f"{logins / statistics.median(secs):>10.1f}{failed:>8}{wrong_text:>11}")
    if answered:
        print(f"\npam_adopt's wait for the agent's answer, ms (n={len(answered)}): "
              f"p50 {statistics.median(answered):.0f}  p90 {pct(answered, 0.9):.0f}  "
              f"p99 {pct(answered, 0.99):.0f}  max {max(answered):.0f}  "
              f"(module timeout {MODULE_TIMEOUT_MS} ms)")
    else:
        print("\n(no pam_adopt lines in the lab's syslog: answer times unknown)")
    print(f"\n{'ALL LOGINS IN THEIR OWN JOB' if ok else 'SOME LOGINS FAILED'}; "
          f"runtime {time.monotonic() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
