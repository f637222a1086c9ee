"""Starvation benchmark: CallerId and a two-job login with 0 and with 200 idle streams.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_starvation.py [--blocks 4] [--name NAME]

It brings up its own 2-node lab (instance `cidlab-stv` unless --name, torn down at the
end). bob has job b1 on both nodes and b2 (newer) on node2; a process of b1 on node1
holds a TCP connection to node2. Blocks alternate between two conditions:

    0 streams     nothing else happens
    200 streams   alice holds 200 OpenJobShell streams against node1's agent that never
                  send a frame (deploy/lab/progs/idle_streams.py: refused past her share
                  of the sessions, ended after the open timeout, opened again a second
                  later), started before the block (measured once the first admitted
                  ones have timed out and come back) and stopped after it

In each block, node2 makes --calls sequential CallerId calls to node1's agent about
b1's connection (as root, one channel, MUNGE: tests/benchmarks/callerid_driver.py), and
bob logs in --logins times from inside b1 on node1 to node2 (`ssh node2 true`, timed by
login_driver.py): node2's agent must ask node1's which of his two jobs it is. The table
gives, per condition, CallerId p50/p90/max and outcomes, the logins' p50/p90/max, where
they landed by the reason node2's agent logged, and its decision time.

For reference, the same attack on 66dd130 (before sessions had threads of their own): 64
idle streams made CallerId time out, and bob's logins landed in the newest job
(unknown-newest) after 2.2 s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lab as lab_mod
from tests.benchmarks.bench_logins import adoptctl, pct

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONDITIONS = ("0 streams", "200 streams")






def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.05)


class Idle:
    """alice's 200 idle streams against node1's agent, for one block."""

    def __init__(self, lab: lab_mod.Lab, work: Path, block: int) -> None:
        self.status = work / f"idle-{block}.json"
        self.proc = lab.popen("node1", [lab.venv_bin("python"), str(work / "idle_streams.py"),
                                        str(self.status), "200"], user="alice",
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while self.read().get("opened", 0) < 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"idle streams did not start: {self.read()}")
            time.sleep(0.1)
        # Measure in the steady state: the first admitted streams ended by the open
        # timeout (5 s) and opened again (on an agent without the timeout: 7 s).
        deadline = time.monotonic() + 7
        while not self.read().get("ended", {}).get("DEADLINE_EXCEEDED"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status.read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self) -> dict[str, Any]:
        status = self.read()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4, help="blocks per condition")
    ap.add_argument("--calls", type=int, default=50, help="CallerId calls per block")
    ap.add_argument("--logins", type=int, default=10, help="logins per block")
    ap.add_argument("--name", default="cidlab-stv", help="lab instance name")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    lab = lab_mod.Lab(f"/run/callerid-lab-bench-{args.name}", nodes=2, venv=REPO / ".venv",
                      name=args.name)
    work = Path(tempfile.mkdtemp(prefix="bench-starvation-"))
    work.chmod(0o1777)
    for prog in (REPO / "deploy" / "lab" / "progs" / "idle_streams.py",
                 REPO / "deploy" / "lab" / "progs" / "holder.py",
                 HERE / "login_driver.py", HERE / "callerid_driver.py"):
        shutil.copy(prog, work / prog.name)
        (work / prog.name).chmod(0o644)
    calls: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    outcomes: dict[str, Counter[str]] = {c: Counter() for c in CONDITIONS}
    logins: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    idle_seen: list[dict[str, Any]] = []
    marks: dict[str, list[tuple[int, int]]] = {c: [] for c in CONDITIONS}
    procs: list[subprocess.Popen[str]] = []
    t_start = time.monotonic()
    try:
        lab.up()
        lab.set_pam("node2", [])
        for node, job in (("node1", "b1"), ("node2", "b1"), ("node2", "b2")):
            adoptctl(lab, node, "job", "run", "--id", job, "--user", "bob", "--",
                     "/bin/sleep", "1000000")
            time.sleep(0.02)  # distinct start times: "newest" is well defined
        conn_file = work / "conn"
        holder = lab.popen("node1", ["/usr/bin/python3", str(work / "holder.py"),
                                     str(conn_file), f"{lab.ip('node2')}:22"], user="bob")
        procs.append(holder)
        adoptctl(lab, "node1", "job", "attach", "b1", str(holder.pid))
        wait_for(conn_file)
        src_ip, src_port, dst_ip, dst_port, _ = conn_file.read_text().splitlines()[0].split()
        caller = lab.popen("node2", [lab.venv_bin("python"), "-u",
                                     str(work / "callerid_driver.py"), "node1"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(caller)
        login = lab.popen("node1", ["/usr/bin/python3", "-u", str(work / "login_driver.py")],
                          user="bob", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(login)
        adoptctl(lab, "node1", "job", "attach", "b1", str(login.pid))

        def caller_ids(n: int) -> dict[str, Any]:
            assert caller.stdin and caller.stdout
            caller.stdin.write(f"{n} {src_ip} {src_port} {dst_ip} {dst_port}\n")
            caller.stdin.flush()
            result: dict[str, Any] = json.loads(caller.stdout.readline())
            return result

        def one_login() -> float:
            assert login.stdin and login.stdout
            login.stdin.write("22 node2\n")
            login.stdin.flush()
            _rc, ms = login.stdout.readline().split()
            return float(ms)

        caller_ids(5)  # warm-up: the channel, caches
        one_login()
        for block in range(args.blocks * len(CONDITIONS)):
            cond = CONDITIONS[block % len(CONDITIONS)]
            idle = Idle(lab, work, block) if cond == "200 streams" else None
            try:
                start = len(lab.agent_log("node2"))
                r = caller_ids(args.calls)
                calls[cond] += r["ms"]
                outcomes[cond].update(r["outcomes"])
                for _ in range(args.logins):
                    logins[cond].append(one_login())
                marks[cond].append((start, len(lab.agent_log("node2"))))
            finally:
                if idle is not None:
                    idle_seen.append(idle.stop())
        log = lab.agent_log("node2")
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=30)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    print("\ncallerid-adopt starvation benchmark: node1's agent with 0 and with 200 idle "
          "OpenJobShell streams of alice's")
    print(f"{args.blocks} blocks per condition, alternating; each: {args.calls} CallerId "
          f"calls node2 -> node1, {args.logins} of bob's two-job logins node1 -> node2; ms\n")
    print(f"{'condition':<13}{'CallerId n':>11}{'p50':>10}{'p90':>10}{'max':>10}  outcomes")
    for c in CONDITIONS:
        ts = calls[c]
        print(f"{c:<13}{len(ts):>11}{statistics.median(ts):>10.2f}{pct(ts, 0.9):>10.2f}"
              f"{max(ts):>10.2f}  {dict(outcomes[c])}")
    print(f"\n{'condition':<13}{'logins n':>11}{'p50':>10}{'p90':>10}{'max':>10}  "
          f"{'landed (reason: n)':<28}agent decision p50 / max")
    for c in CONDITIONS:
        ts = logins[c]
        reasons: Counter[str] = Counter()
        decisions: list[float] = []
        for start, end in marks[c]:
            for m in re.finditer(r"admission: bob .*?: (?:ALLOW|DENY) (\S+)(?: job (\S+))? "
                                 r"\(([\d.]+) ms\)", log[start:end]):
                reasons[f"{m.group(2)} {m.group(1)}"] += 1
                decisions.append(float(m.group(3)))
        print(f"{c:<13}{len(ts):>11}{statistics.median(ts):>10.1f}{pct(ts, 0.9):>10.1f}"
              f"{max(ts):>10.1f}  {', '.join(f'{k}: {v}' for k, v in reasons.items()):<28}"
              f"{statistics.median(decisions):.2f} / {max(decisions):.2f}")
        rows.append({"condition": c, "callerid_ms": calls[c], "callerid_outcomes":
                     dict(outcomes[c]), "login_ms": ts, "landed": dict(reasons),
                     "decision_ms": decisions})
    ended: Counter[str] = Counter()
    for s in idle_seen:
        ended.update(s.get("ended", {}))
    print(f"\nalice's streams, over all 200-stream blocks: ended {dict(ended)}")
    print("reference, 66dd130 (one pool for every call): 64 idle streams -> CallerId timed "
          "out, bob's logins landed in the newest job (unknown-newest) after 2.2 s")
    print(f"\nruntime {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "idle_ended": dict(ended)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
