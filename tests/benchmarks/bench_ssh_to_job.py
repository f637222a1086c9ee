"""ssh-to-job benchmark: session set-up and scp throughput, next to the plain ssh/scp.

Run as root with the project's venv::

    .venv/bin/python tests/benchmarks/bench_ssh_to_job.py [--rounds 20] [--mib 512]
        [--copies 3] [--probes 5] [--json FILE]

It brings up its own 2-node lab (instance `cidlab-bs`, dir /run/callerid-lab-bench-stj,
torn down at the end, also on failure or Ctrl-C) and starts one job of alice on node2
(`/bin/sleep`, working directory a fresh dir of alice's under /var/tmp). Every command
runs as alice inside a lab node and is timed there by a driver process (cmd_driver.py),
so entering the node costs no variant anything.

Session set-up, interleaved login by login in a shuffled order each round, after one
warm-up login of each:

    ssh-to-job, node1 -> node2   node1$ ssh-to-job -name node2 J true   (the target: a user
                                 on a login node debugging a job that runs on node2)
    ssh-to-job, on node2         node2$ ssh-to-job J true               (local socket; info)
    ssh, sshd :2201              node1$ ssh -p 2201 node2 true          (the baseline)

Port 2201 is the lab's sshd with Debian's PAM stack and no extra account module; the lab's
ssh client config (/etc/ssh/ssh_config.d/lab.conf in the nodes: key, known_hosts) serves
ssh and scp alike. Target: ssh-to-job <= 1.5 x ssh, as the ratio of medians.

Throughput, interleaved copy by copy: a file of --mib MiB (random bytes) in a directory
alice can read, copied by alice from node1 into the job's directory on node2:

    ssh-to-job scp   node1$ ssh-to-job -name node2 -ssh scp J SRC remote:DST
    scp :2201        node1$ scp -P 2201 SRC node2:DST

Each copy is timed whole (session set-up included; the "net" column subtracts the
variant's median set-up time). Every copy's size is checked and each variant's first copy
is compared by SHA-256; a copy is removed before the next one starts. Target: ssh-to-job
scp >= 60% of scp's MiB/s (ratio of medians).

Between the two, "where the time goes": a few probes timed the same way (--probes runs
each, median): the interpreter start, the import the ssh-to-job process pays,
ssh-keygen, the agent's launcher interpreter on node2, and both logins with the
classic curve25519 key exchange instead of OpenSSH 9's default sntrup761x25519 (the
difference is what the post-quantum KEX costs each login, in both variants). Each copy
also records the CPU time its nodes used (cpuacct of the lab's node cgroups, read only).

Exit status: 0 when every login and copy succeeded, even when a target fails (this is a
report); 1 when a login or a copy failed or a copy came out wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import pwd
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lab as lab_mod

REPO = Path(__file__).resolve().parents[2]

LAB_DIR = "/run/callerid-lab-bench-stj"
LAB_NAME = "cidlab-bs"
JOB = "stjbench"
USER = "alice"
DRIVER = Path(__file__).with_name("cmd_driver.py")
LOGIN_TARGET = 1.5     # ssh-to-job set-up <= 1.5 x ssh
COPY_TARGET = 0.60     # ssh-to-job scp >= 60% of scp's MiB/s
STJ_LOGIN = "ssh-to-job, node1 -> node2"
STJ_LOCAL = "ssh-to-job, on node2"
SSH_LOGIN = "ssh, sshd :2201"
STJ_COPY = "ssh-to-job scp"
SCP_COPY = "scp :2201"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def shuffled_rounds(rng: random.Random, variants: Iterable[str], rounds: int) -> Iterator[str]:
    """Each variant once per round, in a new random order each round (interleaved runs:
    a drift of the machine hits every variant alike)."""
    order = list(variants)
    for _ in range(rounds):
        rng.shuffle(order)
        yield from order


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_file(path: Path, mib: int, seed: int) -> str:
    """--mib MiB of pseudo-random bytes (incompressible); returns the SHA-256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = rng.randbytes(1 << 20)
            h.update(chunk)
            f.write(chunk)
    path.chmod(0o644)
    return h.hexdigest()


def node_cpu(lab: lab_mod.Lab) -> dict[str, float]:
    """CPU seconds used so far by everything in each lab node (read-only: the lab's own
    cgroups; cpuacct v1, else cgroup2's cpu.stat); {} when neither is there."""
    out: dict[str, float] = {}
    for h in lab.hierarchies:
        for node in lab.nodes:
            d = lab.cgroup(h, node)
            try:
                if h.name == "cpuacct":
                    out[node] = int((d / "cpuacct.usage").read_text()) / 1e9
                elif h.fstype == "cgroup2" and node not in out:
                    stat = dict(line.split() for line in (d / "cpu.stat").read_text()
                                .splitlines())
                    out[node] = int(stat["usage_usec"]) / 1e6
            except (OSError, KeyError, ValueError):
                continue
    return out


class Driver:
    """cmd_driver.py running as USER inside a node; run(argv) -> (rc, ms, stderr tail)."""

    def __init__(self, lab: lab_mod.Lab, node: str, cwd: Path) -> None:
        self.node = node
        self.proc = lab.popen(node, ["/usr/bin/python3", "-u", str(DRIVER)], user=USER,
                              cwd=str(cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def run(self, argv: list[str]) -> tuple[int, float, str]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver on {self.node} died (rc {self.proc.poll()})")
        r = json.loads(line)
        return int(r["rc"]), float(r["ms"]), str(r["err"])

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="logins per variant (>= 20)")
    ap.add_argument("--mib", type=int, default=512, help="size of the copied file, MiB")
    ap.add_argument("--copies", type=int, default=3, help="copies per variant")
    ap.add_argument("--probes", type=int, default=5,
                    help="runs of each where-the-time-goes probe (0: none)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (the lab needs it)")
    if args.rounds < 1 or args.copies < 1 or args.mib < 1 or args.probes < 0:
        ap.error("--rounds, --copies and --mib must be >= 1, --probes >= 0")
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    lab = lab_mod.Lab(LAB_DIR, nodes=2, venv=REPO / ".venv", name=LAB_NAME)
    # Under /var/tmp (disk, as users' data would be), the job's working directory: alice's
    # (chowned once the lab is up: `up` creates the lab users if they are missing).
    work = Path(tempfile.mkdtemp(prefix="callerid-bench-stj-", dir="/var/tmp"))
    src = work / "src.bin"
    dst = {STJ_COPY: work / "dst-ssh-to-job.bin", SCP_COPY: work / "dst-scp.bin"}
    stj = lab.venv_bin("ssh-to-job")
    logins: dict[str, tuple[str, list[str]]] = {
        STJ_LOGIN: ("node1", [stj, "-name", "node2", JOB, "true"]),
        STJ_LOCAL: ("node2", [stj, JOB, "true"]),
        SSH_LOGIN: ("node1", lab.ssh_argv("node2", ["true"], port=2201, family=0)),
    }
    copies: dict[str, list[str]] = {
        STJ_COPY: [stj, "-name", "node2", "-ssh", "scp", JOB, str(src),
                   f"remote:{dst[STJ_COPY]}"],
        SCP_COPY: ["scp", "-P", "2201", str(src), f"node2:{dst[SCP_COPY]}"],
    }
    py = lab.venv_bin("python")
    classic = "KexAlgorithms=curve25519-sha256"
    probes: dict[str, tuple[str, list[str]]] = {
        "venv python start (python -c pass)": ("node1", [py, "-c", "pass"]),
        "import node_agent.cli.ssh_to_job + exit (the CLI)": (
            "node1", [py, "-c", "import node_agent.cli.ssh_to_job"]),
        "ssh-keygen -t ed25519 (the client's session key)": (
            "node1", ["sh", "-c", 'k=$(mktemp -u); ssh-keygen -q -t ed25519 -N "" -f "$k" '
                      '&& rm -f "$k" "$k.pub"']),
        "python -I -S -c pass on node2 (agent's launcher)": (
            "node2", [py, "-I", "-S", "-c", "pass"]),
        f"ssh -o {classic} (no sntrup761)": (
            "node1", lab.ssh_argv("node2", ["true"], port=2201, family=0,
                                  options=[classic])),
        f"ssh-to-job -o {classic}": (
            "node1", [stj, "-name", "node2", "-o", classic, JOB, "true"]),
    }
    probe_ms: dict[str, list[float]] = {v: [] for v in probes}
    copy_cpu: dict[str, list[dict[str, float]]] = {v: [] for v in copies}
    times: dict[str, list[float]] = {v: [] for v in logins}
    copy_ms: dict[str, list[float]] = {v: [] for v in copies}
    failures: dict[str, list[str]] = {v: [] for v in [*logins, *copies, *probes]}
    drivers: dict[str, Driver] = {}
    sessions_opened = 0
    try:
        print(f"lab {LAB_NAME} up in {LAB_DIR} ...", flush=True)
        lab.up()
        pw = pwd.getpwnam(USER)
        os.chown(work, pw.pw_uid, pw.pw_gid)
        work.chmod(0o755)
        r = lab.run("node2", [lab.venv_bin("adoptctl"), "job", "run", "--id", JOB, "--user",
                              USER, "--cwd", str(work), "--", "/bin/sleep", "1000000"])
        print(r.stdout.strip(), flush=True)
        for node in ("node1", "node2"):
            drivers[node] = Driver(lab, node, work)

        def once(variant: str, node: str, argv: list[str]) -> float:
            rc, ms, err = drivers[node].run(argv)
            if rc != 0:
                failures[variant].append(f"rc {rc}: {err}")
            return ms

        for v, (node, argv) in logins.items():  # warm-up: caches, agent channels, sshd
            once(v, node, argv)
        for fs in failures.values():
            if fs:
                raise RuntimeError(f"warm-up login failed: {fs[0]}")
        print(f"logins: {args.rounds} rounds of {len(logins)} ...", flush=True)
        for v in shuffled_rounds(rng, logins, args.rounds):
            times[v].append(once(v, *logins[v]))

        if args.probes:
            print(f"probes: {args.probes} rounds of {len(probes)} ...", flush=True)
        for v in shuffled_rounds(rng, probes, args.probes):
            probe_ms[v].append(once(v, *probes[v]))

        print(f"creating a {args.mib} MiB file ...", flush=True)
        src_sum = make_file(src, args.mib, args.seed)
        size = src.stat().st_size
        print(f"copies: {args.copies} rounds of {len(copies)} ...", flush=True)
        checked: set[str] = set()
        for v in shuffled_rounds(rng, copies, args.copies):
            dst[v].unlink(missing_ok=True)
            n_fail = len(failures[v])
            cpu0 = node_cpu(lab)
            ms = once(v, "node1", copies[v])
            cpu1 = node_cpu(lab)
            copy_cpu[v].append({n: cpu1[n] - cpu0[n] for n in cpu1 if n in cpu0})
            if len(failures[v]) == n_fail:
                got = dst[v].stat().st_size if dst[v].exists() else -1
                if got != size:
                    failures[v].append(f"copy has {got} bytes, not {size}")
                elif v not in checked:
                    checked.add(v)
                    if sha256(dst[v]) != src_sum:
                        failures[v].append("copy differs from the source (SHA-256)")
            copy_ms[v].append(ms)
            dst[v].unlink(missing_ok=True)
        log = lab.agent_log("node2")
        sessions_opened = len(re.findall(r"ssh session \S+ opened", log))
    finally:
        for d in drivers.values():
            d.close()
        try:
            lab.down()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    ok = True
    n_fail = sum(len(f) for f in failures.values())
    base = statistics.median(times[SSH_LOGIN])
    print("\ncallerid-adopt ssh-to-job benchmark, as alice; "
          f"{platform.node()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"\nsession set-up: `... true`, {args.rounds} logins per variant, interleaved login "
          "by login; milliseconds\n")
    print(f"{'variant':<28}{'n':>4}{'fail':>6}{'p50':>9}{'p90':>9}{'mean':>9}{'x ssh':>8}"
          "  target")
    for v, ts in times.items():
        p50 = statistics.median(ts)
        ratio = p50 / base
        verdict = ""
        if v == STJ_LOGIN:
            passed = ratio <= LOGIN_TARGET and not failures[v]
            ok &= passed
            verdict = f"<= {LOGIN_TARGET:g} x: {'PASS' if passed else 'FAIL'}"
        rows.append({"kind": "login", "variant": v, "node": logins[v][0],
                     "command": shlex.join(logins[v][1]), "n": len(ts),
                     "failures": len(failures[v]), "p50_ms": p50, "p90_ms": pct(ts, 0.9),
                     "mean_ms": statistics.fmean(ts), "ratio_to_ssh": ratio})
        print(f"{v:<28}{len(ts):>4}{len(failures[v]):>6}{p50:>9.1f}{pct(ts, 0.9):>9.1f}"
              f"{statistics.fmean(ts):>9.1f}{ratio:>8.2f}  {verdict}")
    print(f"\nthroughput: {args.mib} MiB from node1 to node2, {args.copies} copies per variant, "
          "interleaved; whole command timed (net: minus the variant's median set-up)\n")
    print(f"{'variant':<28}{'n':>4}{'fail':>6}{'MiB/s p50':>11}{'min':>8}{'max':>8}"
          f"{'s p50':>8}{'net MiB/s':>11}{'x scp':>8}  target")
    setup = {STJ_COPY: statistics.median(times[STJ_LOGIN]), SCP_COPY: base}
    rates = {v: [args.mib / (ms / 1000) for ms in mss] for v, mss in copy_ms.items()}
    base_rate = statistics.median(rates[SCP_COPY])
    for v, rs in rates.items():
        p50 = statistics.median(rs)
        secs = statistics.median(copy_ms[v]) / 1000
        net = args.mib / max(secs - setup[v] / 1000, 1e-3)
        ratio = p50 / base_rate
        verdict = ""
        if v == STJ_COPY:
            passed = ratio >= COPY_TARGET and not failures[v]
            ok &= passed
            verdict = f">= {COPY_TARGET:.0%}: {'PASS' if passed else 'FAIL'}"
        rows.append({"kind": "copy", "variant": v, "node": "node1",
                     "command": shlex.join(copies[v]), "n": len(rs),
                     "failures": len(failures[v]), "mib": args.mib, "mib_s_p50": p50,
                     "mib_s_min": min(rs), "mib_s_max": max(rs), "seconds_p50": secs,
                     "net_mib_s": net, "ratio_to_scp": ratio})
        print(f"{v:<28}{len(rs):>4}{len(failures[v]):>6}{p50:>11.1f}{min(rs):>8.1f}"
              f"{max(rs):>8.1f}{secs:>8.2f}{net:>11.1f}{ratio:>7.0%}  {verdict}")
    if any(copy_cpu[v] and copy_cpu[v][0] for v in copy_cpu):
        print("\nCPU seconds per copy (everything in the node, p50):  ", end="")
        print(";  ".join(f"{v}: " + ", ".join(
            f"{n} {statistics.median(c[n] for c in copy_cpu[v]):.2f}"
            for n in sorted(copy_cpu[v][0])) for v in copy_cpu))
        for v in copy_cpu:
            for row in rows:
                if row["variant"] == v:
                    row["cpu_s_p50"] = {n: statistics.median(c[n] for c in copy_cpu[v])
                                        for n in copy_cpu[v][0]}
    if args.probes:
        print(f"\nwhere the time goes: probes, {args.probes} runs each, as alice; ms")
        print(f"{'probe':<58}{'node':>6}{'p50':>9}{'min':>9}")
        for v, ts in probe_ms.items():
            print(f"{v:<58}{probes[v][0]:>6}{statistics.median(ts):>9.1f}{min(ts):>9.1f}")
            rows.append({"kind": "probe", "variant": v, "node": probes[v][0],
                         "command": shlex.join(probes[v][1]), "n": len(ts),
                         "failures": len(failures[v]), "p50_ms": statistics.median(ts),
                         "min_ms": min(ts)})
        kex = base - statistics.median(probe_ms[f"ssh -o {classic} (no sntrup761)"])
        kex_stj = statistics.median(times[STJ_LOGIN]) - statistics.median(
            probe_ms[f"ssh-to-job -o {classic}"])
        print(f"the sntrup761x25519 key exchange costs {kex:.0f} ms per ssh login, "
              f"{kex_stj:.0f} ms per ssh-to-job login (p50 differences)")
    print("\ncommands (as alice, in the node named):")
    for v, (node, argv) in logins.items():
        print(f"  {v:<28}{node}$ {shlex.join(argv)}")
    for v, argv in copies.items():
        print(f"  {v:<28}node1$ {shlex.join(argv)}")
    for node, argv in probes.values() if args.probes else ():
        print(f"  probe: {node}$ {shlex.join(argv)}")
    expected = (args.rounds + 1) * 2 + args.copies + args.probes
    print(f"\nnode2's agent opened {sessions_opened} ssh-to-job sessions (expected {expected})")
    for v, fs in failures.items():
        for why in fs[:3]:
            print(f"FAILED {v}: {why}")
    if n_fail:
        print(f"{n_fail} logins or copies FAILED")
    print(f"\n{'ALL TARGETS PASS' if ok else 'SOME TARGETS FAIL'}; "
          f"runtime {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "targets": {"login_ratio_max": LOGIN_TARGET,
                                      "copy_ratio_min": COPY_TARGET},
            "all_targets_pass": ok, "failures": failures, "rounds": args.rounds,
            "copies": args.copies, "sessions_opened": sessions_opened,
            "load_avg": os.getloadavg()}, indent=2))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
