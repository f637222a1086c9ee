"""Job location benchmark (issue 12): finding a job on clusters of 1, 8 and 32 nodes, through
the job's homes and by the fan-out alone, and `-name` direct, side by side; and what a
32-node lab costs (memory, up and down times).

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_locate.py [--rounds 30] [--cli-rounds 10]
        [--nodes 33] [--sshd] [--name loc] [--json FILE]

It brings up its own lab of --nodes nodes (instance --name, dir /run/callerid-lab-bench-loc,
torn down at the end, also on failure or Ctrl-C), by default without the port-22 sshd of
each node (`up(sshd=False)`: neither the location nor ssh-to-job's sessions need it;
--sshd measures the lab with them). The last node (node33) is the login node: its agent is
stopped, and every search starts there, so that no variant asks the client's own node.
Alice's jobs L1, L8 and L32 run on node1, node8 and node32 (`/bin/sleep`): in each variant
the job is on the last node of the cluster searched.

Each size n is a cluster of its own, measured in turn: node1..n's agents are restarted
with `nodes = "node[1-n]"` (a job's homes are hashed over the cluster's nodes, so the
agents and the client must share the set), then, timed in a driver process on the login
node as alice (locate_driver.py: the CLIs' own Locator with real MUNGE and fresh
connections for every locate, without the interpreter's start), interleaved locate by
locate in a shuffled order each round, after one warm-up each:

    located, n nodes        the CLIs' search: the job's homes, then its node (n > 2)
    fan-out only, n nodes   the same Locator with the homes skipped: ListJobs to every node
    fan-out only, 32, 8 at once   the same with locate_parallel = 8
    -name node32            job L32, asked directly (no search)

locate_parallel is the default (32) but in the row that says otherwise. The table also
says how many locates the homes answered (the rest fell back to the fan-out).
Target: locating over 32 nodes <= 3 x one node (ratio of medians).

Then the whole CLI from the login node, `ssh-to-job L1 true` on the 1-node cluster,
`ssh-to-job L32 true` on the 32-node one and with `-name node32` (cmd_driver.py),
interleaved, --cli-rounds each: what a user waits.

Beside each locate's time, the CPU it cost: the driver's own (the client) and that of the
lab's agents and munged (psutil, read from the host before and after each locate). The
lab's nodes share the machine's cores, so a search can go no faster than all of it
divided by the cores; on a cluster, each agent's share runs on its own node.

The lab's cost: time of `up` (all --nodes nodes) and `down`; memory as the sum of the RSS
of the lab's daemons by kind (the 32 compute nodes' agents, munged, sshd when --sshd),
read with psutil from their pid files once the login node's agent is stopped (the node
cgroups' memory would need the memory controller, which the lab never uses).

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


def daemons(lab: lab_mod.Lab, kinds: tuple[str, ...] = ()) -> list[tuple[str, psutil.Process]]:
    """(kind, process) of the lab's daemons that run now (of `kinds` only, if given), from
    their pid files."""
    out = []
    for kind in lab.daemons:
        if kinds and kind.name not in kinds:
            continue
        for pidfile in kind.pidfiles():
            try:
                out.append((kind.name, psutil.Process(int(pidfile.read_text().split()[0]))))
            except (OSError, ValueError, IndexError, psutil.Error):  # stopped, or gone
                continue
    return out


def rss_by_kind(lab: lab_mod.Lab) -> dict[str, tuple[int, float]]:
    """Daemon kind -> (processes, MiB of RSS)."""
    out: dict[str, tuple[int, float]] = {}
    for kind, p in daemons(lab):
        try:
            rss = p.memory_info().rss
        except psutil.Error:  # Race: it is gone
            continue
        n, mib = out.get(kind, (0, 0.0))
        out[kind] = (n + 1, mib + rss / 2**20)
    return out


def server_processes(lab: lab_mod.Lab) -> list[psutil.Process]:
    """The lab's agents and munged that run now."""
    return [p for _, p in daemons(lab, ("agent", "munged"))]


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
    lines = [title, f"  {'variant':<28} {'n':>3} {'median ms':>10} {'p90 ms':>8} "
                    f"{'x ' + base:>16}"]
    b = statistics.median(times[base]) if times[base] else float("nan")
    for v, t in times.items():
        if not t:
            lines.append(f"  {v:<28} {0:>3} {'-':>10}")
            continue
        m = statistics.median(t)
        lines.append(f"  {v:<28} {len(t):>3} {m:>10.1f} {pct(t, 90):>8.1f} {m / b:>16.2f}")
    return lines


def cluster_of(lab: lab_mod.Lab, members: list[str], nodeset: str) -> None:
    """Make `members` a cluster of their own: nodes = `nodeset` in their agent.toml, and
    their agents restarted on it (those whose configuration already says so are left)."""
    changed = []
    for node in members:
        path = lab.dir / "nodes" / node / "etc" / "agent.toml"
        text = lab.agent_config(node).replace(f'nodes = "{lab.nodeset()}"',
                                              f'nodes = "{nodeset}"')
        if path.read_text() != text:
            path.write_text(text)
            changed.append(node)
    for node in changed:
        lab.agent_stop(node)
    if changed:
        lab.agents_start(changed)


def login_node(lab: lab_mod.Lab) -> str:
    """The lab's last node: the login node (no agent), where every search starts."""
    return lab.nodes[-1]


def client_config(lab: lab_mod.Lab, work: Path, name: str, nodeset: str,
                  *extra: str) -> str:
    """The login node's agent.toml with nodes = `nodeset` (and `extra` lines), for the
    driver."""
    text = lab.agent_config(login_node(lab)).replace(f'nodes = "{lab.nodeset()}"',
                                             "\n".join([*extra, f'nodes = "{nodeset}"']))
    path = work / name
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def wait_for_index(loc: Driver, variant: dict[str, Any], n: int) -> None:
    """Until the job's homes know it (its agent announces within a second of its start):
    over more than two nodes, a locate through them; 10 s at most, then the figures say
    how many locates the homes answered."""
    if n <= 2:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = loc.ask({k: variant[k] for k in ("config", "job", "node", "homes")})
        if r["via_homes"]:
            return
        time.sleep(0.2)
    print(f"  (the homes of {variant['job']} did not know it after 10 s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="locates per variant")
    ap.add_argument("--cli-rounds", type=int, default=10,
                    help="ssh-to-job runs per variant (0: none)")
    ap.add_argument("--nodes", type=int, default=max(SIZES) + 1,
                    help="lab size, the login node included (>= %(default)s)")
    ap.add_argument("--sshd", action="store_true", help="also run each node's port-22 sshd")
    ap.add_argument("--name", default="loc", help="lab instance name (default: %(default)s)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (the lab needs it)")
    if args.rounds < 1 or args.cli_rounds < 0 or args.nodes < max(SIZES) + 1:
        ap.error(f"--rounds >= 1, --cli-rounds >= 0, --nodes >= {max(SIZES) + 1}")
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
        login = login_node(lab)
        lab.agent_stop(login)
        figures["rss_mib"] = rss_by_kind(lab)
        for n in SIZES:
            lab.run(f"node{n}", [lab.venv_bin("adoptctl"), "job", "run", "--id", f"L{n}",
                                 "--user", USER, "--", "/bin/sleep", "1000000"])
        py = lab.venv_bin("python")
        loc = Driver(lab, login, [py, "-u", str(DRIVER)], work)
        drivers.append(loc)
        cli: Driver | None = None
        if args.cli_rounds:
            cli = Driver(lab, login, ["/usr/bin/python3", "-u", str(CMD_DRIVER)], work)
            drivers.append(cli)
        stj = lab.venv_bin("ssh-to-job")
        servers = server_processes(lab)
        times: dict[str, list[float]] = {}
        via_homes: dict[str, int] = {}
        cpu: dict[str, dict[str, list[float]]] = {}
        cli_times: dict[str, list[float]] = {}
        failures: dict[str, list[str]] = {}
        last = max(SIZES)

        def servers_cpu() -> float:
            total = 0.0
            for p in list(servers):
                try:
                    total += sum(p.cpu_times()[:2])
                except psutil.NoSuchProcess:  # an agent restarted between phases
                    servers.remove(p)
            return total * 1000

        def locate_once(v: dict[str, Any]) -> tuple[bool, float, str]:
            s0 = servers_cpu()
            r = loc.ask({k: v[k] for k in ("config", "job", "node", "homes")})
            s1 = servers_cpu()
            ok = bool(r["ok"]) and r["node"] == v["want"]
            c = cpu.setdefault(v["name"], {"client": [], "servers": []})
            c["client"].append(float(r["cpu_ms"]))
            c["servers"].append(s1 - s0)
            via_homes[v["name"]] = via_homes.get(v["name"], 0) + bool(r["via_homes"])
            return ok, float(r["ms"]), r["err"] or f"found on {r['node']}"

        for n in SIZES:
            # A cluster of n nodes: node1..n's agents and the client share nodes = its set.
            members = [f"node{i}" for i in range(1, n + 1)]
            nodeset = "node1" if n == 1 else f"node[1-{n}]"
            print(f"  {n} node{'s' if n > 1 else ''}: nodes = \"{nodeset}\" on node1..{n} "
                  "(their agents restarted)", flush=True)
            cluster_of(lab, members, nodeset)
            servers[:] = server_processes(lab)
            config = client_config(lab, work, f"nodes{n}.toml", nodeset)
            plural = "s" if n > 1 else ""
            variants: dict[str, dict[str, Any]] = {
                f"located, {n} node{plural}": {"config": config, "job": f"L{n}", "node": None,
                                               "homes": True, "want": f"node{n}"},
                f"fan-out only, {n} node{plural}": {"config": config, "job": f"L{n}",
                                                    "node": None, "homes": False,
                                                    "want": f"node{n}"}}
            if n == last:
                variants[f"fan-out only, {n}, 8 at once"] = {
                    "config": client_config(lab, work, f"nodes{n}-p8.toml", nodeset,
                                            "locate_parallel = 8"),
                    "job": f"L{n}", "node": None, "homes": False, "want": f"node{n}"}
                variants[f"-name node{n}"] = {"config": config, "job": f"L{n}",
                                              "node": f"node{n}", "homes": True,
                                              "want": f"node{n}"}
            for name, v in variants.items():
                v["name"] = name
            wait_for_index(loc, variants[f"located, {n} node{plural}"], n)
            t, f = interleaved(variants, args.rounds, rng, locate_once)
            times.update(t)
            failures.update(f)
            if cli is not None and n in (1, last):
                cli_variants = {f"ssh-to-job, {n} node{plural}":
                                [stj, "-config", config, f"L{n}", "true"]}
                if n == last:
                    cli_variants[f"ssh-to-job -name node{n}"] = [
                        stj, "-config", config, "-name", f"node{n}", f"L{n}", "true"]

                def cli_once(argv: list[str]) -> tuple[bool, float, str]:
                    assert cli is not None
                    r = cli.ask(argv)
                    return r["rc"] == 0, float(r["ms"]), r["err"]

                t, f = interleaved(cli_variants, args.cli_rounds, rng, cli_once)
                cli_times.update(t)
                failures.update(f)
        figures["locate_ms"] = times
        figures["locate_cpu_ms"] = cpu
        figures["via_homes"] = via_homes
        base = "located, 1 node"
        cores = os.cpu_count() or 1
        lines = table(f"locating a job (in-process Locator on {login}, {args.rounds} rounds, "
                      "job on the last node):", times, base)
        lines.append(f"  found through the job's homes (of {args.rounds} + 1 warm-up):")
        lines.append("  " + ", ".join(f"{name}: {via_homes.get(name, 0)}" for name in times))
        # Means: the agents' CPU times come in clock ticks (10 ms), so a median of single
        # locates says 0; their mean over the rounds is what they cost.
        lines.append(f"  CPU per locate (means; {cores} cores shared by everything):")
        for name, c in cpu.items():
            client, srv = statistics.mean(c["client"]), statistics.mean(c["servers"])
            lines.append(f"  {name:<28} client {client:6.1f} ms  agents+munged {srv:6.1f} ms"
                         f"  -> no faster than {(client + srv) / cores:6.1f} ms here")

        def ratio(name: str) -> float:
            return (statistics.median(times[name]) / statistics.median(times[base])
                    if times.get(name) and times.get(base) else float("nan"))

        figures["ratio_32_to_1"] = r32 = ratio(f"located, {last} nodes")
        figures["ratio_32_to_1_fan_out_only"] = ratio(f"fan-out only, {last} nodes")
        lines.append(f"  target: locating over {last} nodes <= {TARGET:g} x one node: "
                     f"{r32:.2f} x -> {'met' if r32 <= TARGET else 'NOT met'} (the fan-out "
                     f"alone: {figures['ratio_32_to_1_fan_out_only']:.2f} x)")
        if cli_times:
            figures["cli_ms"] = cli_times
            lines += table(f"the whole CLI (ssh-to-job ... true, {args.cli_rounds} rounds):",
                           cli_times, next(iter(cli_times)))
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
    print(f"a lab of {args.nodes} nodes, the login node's agent stopped (sshd: {args.sshd}): "
          f"up {figures.get('up_s', 0):.1f} s,"
          f" down {figures['down_s']:.1f} s; RSS {total:.0f} MiB: "
          + ", ".join(f"{k} {n} x = {m:.0f} MiB" for k, (n, m) in rss.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
