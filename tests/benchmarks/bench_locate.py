"""Job location benchmark (issue 12): the fan-out over 1, 8 and 32 nodes and `-name` direct,
side by side, and what a 32-node lab costs (memory, up and down times).

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_locate.py [--rounds 30] [--cli-rounds 10]
        [--nodes 32] [--sshd] [--name loc] [--json FILE]

It brings up its own lab of --nodes nodes (instance --name, dir /run/callerid-lab-bench-loc,
torn down at the end, also on failure or Ctrl-C), by default without the port-22 sshd of
each node (`up(sshd=False)`: neither the location nor ssh-to-job's sessions need it;
--sshd measures the lab with them). Alice's jobs L1, L8 and L32 run on node1, node8 and
node32 (`/bin/sleep`): in each variant the job is on the last node of the set searched.

Locating, timed in a driver process on node1 as alice (locate_driver.py: the CLIs' own
Locator with real MUNGE and fresh connections for every locate, without the interpreter's
start), interleaved locate by locate in a shuffled order each round after one warm-up
each:

    fan-out, 1 node     nodes = "node1"         job L1   (the baseline)
    fan-out, 8 nodes    nodes = "node[1-8]"     job L8
    fan-out, 32 nodes   nodes = "node[1-32]"    job L32
    fan-out, 32, 8 at once                      the same with locate_parallel = 8
    -name node32        nodes = "node[1-32]"    job L32, asked directly (no search)

locate_parallel is the default (32) but in the row that says otherwise: the 32-node
search has every call in flight at once.
Target: fan-out over 32 nodes <= 3 x one node (ratio of medians).

Then the whole CLI, `ssh-to-job L1 true` with nodes = "node1", `ssh-to-job L32 true` with
the 32-node set and with `-name node32` (cmd_driver.py, timed inside node1), interleaved,
--cli-rounds each: what a user waits.

Beside each locate's time, the CPU it cost: the driver's own (the client) and that of the
lab's agents and munged (psutil, read from the host before and after each locate). The
lab's nodes share the machine's cores, so a fan-out can go no faster than all of it
divided by the cores; on a cluster, each agent's share runs on its own node.

The lab's cost: time of `up` and `down`; memory as the sum of the RSS of the lab's daemons
by kind (agents, munged, sshd when --sshd), read with psutil from their pid files (the
node cgroups' memory would need the memory controller, which the lab never uses).

Exit status: 0 when every locate and session succeeded, even when the target fails (this
is a report); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import lab as lab_mod

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = "/run/callerid-lab-bench-loc"
USER = "alice"
DRIVER = Path(__file__).with_name("locate_driver.py")
CMD_DRIVER = Path(__file__).with_name("cmd_driver.py")
TARGET = 3.0  # fan-out over 32 nodes <= 3 x one node
SIZES = (1, 8, 32)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Driver:
    """A JSON-lines driver running as USER in a node: ask(obj) -> the answer's dict."""

    def __init__(self, lab: lab_mod.Lab, node: str, argv: list[str], cwd: Path) -> None:
        self.node = node
        self.proc = lab.popen(node, argv, user=USER, cwd=str(cwd), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def ask(self, request: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver on {self.node} died (rc {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rss_by_kind(lab: lab_mod.Lab) -> dict[str, tuple[int, float]]:
    """Daemon kind -> (processes, MiB of RSS), from the lab's pid files."""
    out: dict[str, tuple[int, float]] = {}
    for kind in lab.daemons:
        n, rss = 0, 0
        for pidfile in kind.pidfiles():
            try:
                pid = int(pidfile.read_text().split()[0])
                rss += psutil.Process(pid).memory_info().rss
                n += 1
            except (OSError, ValueError, IndexError, psutil.Error):  # Race: it is gone
                continue
        if n:
            out[kind.name] = (n, rss / 2**20)
    return out


def interleaved(variants: dict[str, Any], rounds: int, rng: random.Random,
                once: Any) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    times: dict[str, list[float]] = {v: [] for v in variants}
    failures: dict[str, list[str]] = {v: [] for v in variants}

    def run(v: str, keep: bool) -> None:
        ok, ms, why = once(variants[v])
        if not ok:
            failures[v].append(why)
        elif keep:
            times[v].append(ms)

    for v in variants:
        run(v, keep=False)
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            run(v, keep=True)
    return times, failures


def table(title: str, times: dict[str, list[float]], base: str) -> list[str]:
    lines = [title, f"  {'variant':<22} {'n':>3} {'median ms':>10} {'p90 ms':>8} "
                    f"{'x ' + base:>16}"]
    b = statistics.median(times[base]) if times[base] else float("nan")
    for v, t in times.items():
        if not t:
            lines.append(f"  {v:<22} {0:>3} {'-':>10}")
            continue
        m = statistics.median(t)
        lines.append(f"  {v:<22} {len(t):>3} {m:>10.1f} {pct(t, 90):>8.1f} {m / b:>16.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="locates per variant")
    ap.add_argument("--cli-rounds", type=int, default=10,
                    help="ssh-to-job runs per variant (0: none)")
    ap.add_argument("--nodes", type=int, default=32, help="lab size (>= 32)")
    ap.add_argument("--sshd", action="store_true", help="also run each node's port-22 sshd")
    ap.add_argument("--name", default="loc", help="lab instance name (default: %(default)s)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (the lab needs it)")
    if args.rounds < 1 or args.cli_rounds < 0 or args.nodes < max(SIZES):
        ap.error(f"--rounds >= 1, --cli-rounds >= 0, --nodes >= {max(SIZES)}")
    rng = random.Random(args.seed)
    lab = lab_mod.Lab(LAB_DIR, nodes=args.nodes, venv=REPO / ".venv", name=args.name)
    work = Path(tempfile.mkdtemp(prefix="callerid-bench-loc-"))
    work.chmod(0o755)
    drivers: list[Driver] = []
    figures: dict[str, Any] = {"nodes": args.nodes, "sshd": args.sshd}
    failed = False
    try:
        print(f"lab {args.name}: up with {args.nodes} nodes (sshd: {args.sshd}) ...",
              flush=True)
        t0 = time.monotonic()
        lab.up(sshd=args.sshd)
        figures["up_s"] = time.monotonic() - t0
        figures["rss_mib"] = rss_by_kind(lab)
        for n in SIZES:
            lab.run(f"node{n}", [lab.venv_bin("adoptctl"), "job", "run", "--id", f"L{n}",
                                 "--user", USER, "--", "/bin/sleep", "1000000"])
        configs = {}
        for n in SIZES:
            text = lab.agent_config("node1").replace(
                f'nodes = "{lab.nodeset()}"', f'nodes = "{"node1" if n == 1 else f"node[1-{n}]"}"')
            path = work / f"nodes{n}.toml"
            path.write_text(text)
            path.chmod(0o644)
            configs[n] = str(path)
        variants: dict[str, dict[str, Any]] = {
            f"fan-out, {n} node{'s' if n > 1 else ''}":
                {"config": configs[n], "job": f"L{n}", "node": None, "want": f"node{n}"}
            for n in SIZES}
        last = max(SIZES)
        path = work / f"nodes{last}-p8.toml"
        path.write_text(Path(configs[last]).read_text().replace(
            'nodes = "', "locate_parallel = 8\nnodes = \"", 1))
        path.chmod(0o644)
        variants[f"fan-out, {last}, 8 at once"] = {"config": str(path), "job": f"L{last}",
                                                   "node": None, "want": f"node{last}"}
        variants[f"-name node{last}"] = {"config": configs[last], "job": f"L{last}",
                                         "node": f"node{last}", "want": f"node{last}"}
        py = lab.venv_bin("python")
        loc = Driver(lab, "node1", [py, "-u", str(DRIVER)], work)
        drivers.append(loc)

        servers = [psutil.Process(int(p.read_text().split()[0]))
                   for kind in lab.daemons if kind.name in ("agent", "munged")
                   for p in kind.pidfiles()]
        cpu: dict[str, dict[str, list[float]]] = {v: {"client": [], "servers": []}
                                                  for v in variants}

        def servers_cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in servers) * 1000

        def locate_once(v: dict[str, Any]) -> tuple[bool, float, str]:
            s0 = servers_cpu()
            r = loc.ask({k: v[k] for k in ("config", "job", "node")})
            s1 = servers_cpu()
            ok = bool(r["ok"]) and r["node"] == v["want"]
            cpu[v["name"]]["client"].append(float(r["cpu_ms"]))
            cpu[v["name"]]["servers"].append(s1 - s0)
            return ok, float(r["ms"]), r["err"] or f"found on {r['node']}"

        for name, v in variants.items():
            v["name"] = name
        times, failures = interleaved(variants, args.rounds, rng, locate_once)
        figures["locate_ms"] = times
        figures["locate_cpu_ms"] = cpu
        base = next(iter(variants))
        cores = os.cpu_count() or 1
        lines = table(f"locating a job (in-process Locator on node1, {args.rounds} rounds, "
                      "job on the last node):", times, base)
        # Means: the agents' CPU times come in clock ticks (10 ms), so a median of single
        # locates says 0; their mean over the rounds is what they cost.
        lines.append(f"  CPU per locate (means; {cores} cores shared by everything):")
        for name, c in cpu.items():
            client, srv = statistics.mean(c["client"]), statistics.mean(c["servers"])
            lines.append(f"  {name:<22} client {client:6.1f} ms  agents+munged {srv:6.1f} ms  "
                         f"-> no faster than {(client + srv) / cores:6.1f} ms here")
        ratio = (statistics.median(times[f"fan-out, {last} nodes"])
                 / statistics.median(times[base])) if all(times.values()) else float("nan")
        figures["ratio_32_to_1"] = ratio
        lines.append(f"  target: fan-out over {last} nodes <= {TARGET:g} x one node: "
                     f"{ratio:.2f} x -> {'met' if ratio <= TARGET else 'NOT met'}")
        cli_times: dict[str, list[float]] = {}
        if args.cli_rounds:
            stj = lab.venv_bin("ssh-to-job")
            cli = Driver(lab, "node1", ["/usr/bin/python3", "-u", str(CMD_DRIVER)], work)
            drivers.append(cli)
            cli_variants = {
                "ssh-to-job, 1 node": [stj, "-config", configs[1], "L1", "true"],
                f"ssh-to-job, {last} nodes": [stj, "-config", configs[last], f"L{last}", "true"],
                f"ssh-to-job -name node{last}": [stj, "-config", configs[last], "-name",
                                                  f"node{last}", f"L{last}", "true"]}

            def cli_once(argv: list[str]) -> tuple[bool, float, str]:
                r = cli.ask(argv)
                return r["rc"] == 0, float(r["ms"]), r["err"]

            cli_times, cli_failures = interleaved(cli_variants, args.cli_rounds, rng, cli_once)
            failures.update(cli_failures)
            figures["cli_ms"] = cli_times
            lines += table(f"the whole CLI (ssh-to-job ... true, {args.cli_rounds} rounds):",
                           cli_times, next(iter(cli_variants)))
        print("\n".join(lines))
        for name, why in failures.items():
            if why:
                failed = True
                print(f"FAILED {name}: {len(why)} x, e.g. {why[0]}")
        figures["failures"] = {v: w for v, w in failures.items() if w}
    finally:
        for d in drivers:
            d.close()
        t0 = time.monotonic()
        lab.down()
        figures["down_s"] = time.monotonic() - t0
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    rss = figures.get("rss_mib", {})
    total = sum(m for _, m in rss.values())
    print(f"a lab of {args.nodes} nodes (sshd: {args.sshd}): up {figures.get('up_s', 0):.1f} s,"
          f" down {figures['down_s']:.1f} s; RSS {total:.0f} MiB: "
          + ", ".join(f"{k} {n} x = {m:.0f} MiB" for k, (n, m) in rss.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
