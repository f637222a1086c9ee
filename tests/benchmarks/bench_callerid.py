"""Caller-ID benchmark: connection -> job, on a lab node full of sockets and processes.

Run as root with the project's venv (``make bench``)::

    .venv/bin/python tests/benchmarks/bench_callerid.py [--json FILE] [--seed N]

What it does
------------
1. Brings up its own 2-node lab (``deploy/lab/lab.py``, state dir
   ``/run/callerid-lab-bench``, agents running) and always tears it down at the end, also
   after an error or Ctrl-C. It refuses to start while another lab holds the machine.
2. Fills node1 with load made of native-registry JOBS (``adoptctl job run``) of several
   users (alice, bob, nobody, daemon: those that exist; 2 jobs each). Each job's main
   process is ``socket_farm.py`` (next to this file): it opens TCP connections to
   listeners of its own on node1's lab addresses (IPv4, IPv6, and a dual-stack ``[::]``
   listener that sees ``::ffff:`` peers), keeps both ends, and hands the sockets out in
   batches to child ``sleep`` processes. Two phases:

   - phase A: ~2,000 TCP sockets held by ~2,000 processes (1 socket each);
   - phase B: ~20,000 TCP sockets held by ~2,000 processes (10 each).

   Phase A's jobs are ended (``adoptctl job end``) before phase B starts. The socket and
   process counts in the table are MEASURED inside node1 (lines of ``/proc/net/tcp`` +
   ``tcp6``; processes whose ``ns/net`` is node1's), not the planned ones.
3. Per phase, in the same node state, a measuring process inside node1 resolves a random
   sample of the farms' connections (either end, mixed jobs and address families) with
   three methods, interleaved per sample (a, b, c, a, a, ..., a, b, c, ...):

   (a) ``callerid.Resolver(layout).resolve(conn)``, the layout discovered from node1's
       agent config (``[cgroup]`` of /etc/callerid-adopt/agent.toml): one netlink
       sock_diag exact lookup + cgroup id -> job (the first call, which builds the
       layout's cgroup-id cache, is reported apart as "cold");
   (b) ``Resolver.resolve_slurm_style(conn)``: parse /proc/net/tcp{,6}, walk every fd of
       every process, read the holder's /proc/<pid>/cgroup (what Slurm does);
   (c) ``psutil.net_connections(kind="tcp")`` -> the matching entry's pid ->
       /proc/<pid>/cgroup -> job.

   Every answer is checked against the job that made the connection; wrong answers are
   counted and printed. The slow methods get fewer samples (spread evenly over the run).
4. Per phase, from node2, CallerId gRPC calls to node1's agent over the lab IPv4 address,
   each carrying its own MUNGE credential: 200 sequential round trips (p50/p99,
   end-to-end gRPC + MUNGE), then 500 concurrent calls issued as futures through
   ``node_agent.client.AgentClient`` (whose interceptor mints one credential per call while
   issuing), then 500 concurrent calls with credentials minted beforehand (the agent's
   side alone). Wall time runs from the first issue to the last answer. Afterwards the
   agent's VmRSS and VmHWM (/proc/<pid>/status).

Reading the table
-----------------
Columns are the two phases. Latencies are milliseconds, per call: p50 (median), p99
(linear interpolation; with 30 samples p99 is close to the maximum), mean. "n=" is how
many samples a method got. "mean per step" splits each method by the steps it reports
(the Resolution's steps for (a) and (b): their timing includes formatting each step's
detail text). "(a) socket of a process in no job" is the other path of (a): a connection
of the measuring process itself (root, in no job), where the cgroup id names no job, so
the layout rescans the job cgroups and the resolver walks the fds of root's processes.
Speedups are p50(b or c) / p50(a) (the mean ratio is given too). "wrong" counts answers
that named no job or another job. "server CPU per call" is the agent's and munged's CPU
time (utime + stime) during the gRPC step divided by the calls it made. The TARGETS block
judges phase B (20k sockets): (a) p50 <= 0.5 ms and p99 <= 2 ms; (a) >= 50x faster
than (b) and (c) by p50; 500 concurrent AgentClient calls all correct within 1 s; no
wrong answer anywhere. Exit status 0 when every target holds, 1 otherwise, 2 when the
benchmark could not run. ``--json FILE`` writes every figure.

Internal modes (run by the benchmark inside the lab nodes, not by hand):
``bench_callerid.py measure SAMPLE JOBS`` and ``bench_callerid.py grpc TARGET SAMPLE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lab as lab_mod

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

LAB_DIR = Path("/run/callerid-lab-bench")
FARM = HERE / "socket_farm.py"
SYSTEM_PYTHON = "/usr/bin/python3"
USERS = ("alice", "bob", "nobody", "daemon")
MIN_USERS = 3
JOBS_PER_USER = 2
SAMPLE_SIZE = 300  # connections per phase; method (a) resolves all of them
SLOW_SAMPLES = 30  # methods (b) and (c)
CONCURRENT = 500
SEQUENTIAL = 200
FARM_TIMEOUT = 120.0
RPC_TIMEOUT = 10.0
AGENT_CONFIG = "/etc/callerid-adopt/agent.toml"
MUNGE_SOCKET = "/run/munge/munge.socket.2"

# Targets (judged on phase B).
TARGET_P50_MS = 0.5
TARGET_P99_MS = 2.0
TARGET_SPEEDUP = 50.0
TARGET_CONCURRENT_S = 1.0

START = time.monotonic()
Sample = list[Any]  # [local_ip, local_port, remote_ip, remote_port, job_id, kind, side]
Json = dict[str, Any]


@dataclass(frozen=True)
class Phase:
    name: str
    sockets: int  # planned TCP sockets in node1 (both ends of every connection)
    processes: int  # planned holder processes


PHASES = (Phase("A", 2_000, 2_000), Phase("B", 20_000, 2_000))


# ----------------------------------------------------------------------------- helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..1) of a non-empty sequence."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(ns: Sequence[int]) -> Json:
    ms = [x / 1e6 for x in ns]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99),
            "mean": sum(ms) / len(ms), "min": min(ms), "max": max(ms)}


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def last_json_line(text: str) -> Json:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            result: Json = json.loads(line)
            return result
    raise RuntimeError(f"no JSON in output:\n{text[-2000:]}")


# ------------------------------------------------------------- inside node1: measure


def node_state(jobs: Sequence[str], layout: Any) -> Json:
    """Sockets and processes as node1 sees them (run inside node1)."""
    states: dict[str, int] = {}
    names = {"01": "ESTABLISHED", "0A": "LISTEN", "06": "TIME_WAIT"}
    lines = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) < 4:
                    continue
                lines += 1
                st = names.get(fields[3], "other")
                states[st] = states.get(st, 0) + 1
    own = os.stat("/proc/self/ns/net").st_ino
    procs = fds = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}/ns/net").st_ino != own:
                continue
            n = len(os.listdir(f"/proc/{name}/fd"))
        except OSError:
            continue
        procs += 1
        fds += n
    job_procs = sum(len(layout.procs(j)) for j in jobs)
    return {"tcp_sockets": lines, "tcp_states": states, "processes": procs, "fds": fds,
            "job_processes": job_procs}


def measure_main(args: argparse.Namespace) -> int:
    import psutil  # type: ignore[import-untyped,unused-ignore]

    from callerid import (
        CgroupLayout,
        Connection,
        Endpoint,
        Resolver,
        normalize_ip,
        read_proc_cgroups,
    )
    from node_agent import config as config_mod

    cfg = config_mod.load(args.config)
    layout = CgroupLayout.discover(cfg.cgroup)
    resolver = Resolver(layout)
    if not resolver.uses_netlink:
        raise SystemExit("measure: netlink sock_diag is unavailable")
    raw: list[Sample] = json.loads(Path(args.sample).read_text())
    sample = [(Connection(Endpoint(normalize_ip(s[0]), int(s[1])),
                          Endpoint(normalize_ip(s[2]), int(s[3]))), str(s[4]), s) for s in raw]
    jobs = sorted({job for _c, job, _s in sample} | set(args.jobs.split(",")))
    state = node_state(jobs, layout)

    def method_a(conn: Connection) -> tuple[str | None, list[tuple[str, float]]]:
        r = resolver.resolve(conn)
        return r.job_id, [(s.name, s.micros) for s in r.steps]

    def method_b(conn: Connection) -> tuple[str | None, list[tuple[str, float]]]:
        r = resolver.resolve_slurm_style(conn)
        return r.job_id, [(s.name, s.micros) for s in r.steps]

    def method_c(conn: Connection) -> tuple[str | None, list[tuple[str, float]]]:
        t0 = time.perf_counter_ns()
        pid = None
        for c in psutil.net_connections(kind="tcp"):
            if not c.raddr or c.laddr.port != conn.local.port or c.raddr.port != conn.remote.port:
                continue
            if (normalize_ip(c.laddr.ip) == conn.local.ip
                    and normalize_ip(c.raddr.ip) == conn.remote.ip):
                pid = c.pid
                break
        t1 = time.perf_counter_ns()
        job = None
        if pid is not None:
            job = layout.job_for_proc_cgroups(read_proc_cgroups(pid))
        t2 = time.perf_counter_ns()
        return job, [("net_connections", (t1 - t0) / 1e3), ("pid-cgroup", (t2 - t1) / 1e3)]

    methods: dict[str, Callable[[Connection], tuple[str | None, list[tuple[str, float]]]]] = {
        "a": method_a, "b": method_b, "c": method_c}
    times: dict[str, list[int]] = {m: [] for m in methods}
    steps: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    wrong: list[Json] = []

    def run(m: str, conn: Connection, job: str, s: Sample) -> int:
        t0 = time.perf_counter_ns()
        got, st = methods[m](conn)
        dt = time.perf_counter_ns() - t0
        if got != job:
            wrong.append({"method": m, "connection": str(conn), "kind": s[5], "side": s[6],
                          "expected": job, "got": got})
        for name, micros in st:
            steps[m].setdefault(name, []).append(micros)
        return dt

    # The first (a) call builds the layout's cgroup-id cache: reported apart, not counted.
    conn0, job0, s0 = sample[0]
    cold_ns = run("a", conn0, job0, s0)
    steps["a"].clear()
    n_fast = min(args.fast, len(sample))
    n_slow = min(args.slow, n_fast)
    stride = max(1, n_fast // max(1, n_slow))
    slow_done = 0
    for i, (conn, job, s) in enumerate(sample[:n_fast]):
        times["a"].append(run("a", conn, job, s))
        if i % stride == 0 and slow_done < n_slow:
            times["b"].append(run("b", conn, job, s))
            times["c"].append(run("c", conn, job, s))
            slow_done += 1
    nojob = measure_no_job(resolver)
    resolver.close()
    out = {
        "state": state,
        "cold_a_ms": cold_ns / 1e6,
        "no_job": nojob,
        "methods": {m: summary_ms(times[m]) for m in methods},
        "steps_us": {m: {k: {"mean": sum(v) / len(v), "p50": percentile(v, 0.5),
                             "max": max(v)} for k, v in steps[m].items()} for m in methods},
        "wrong": {m: sum(1 for w in wrong if w["method"] == m) for m in methods},
        "wrong_answers": wrong,
    }
    print(json.dumps(out))
    return 0


def measure_no_job(resolver: Any, n: int = 20) -> Json:
    """(a) for a connection of a process in no job (this measuring process, root, over
    node1's loopback): the cgroup id is no job's, so the layout rescans the job cgroups,
    then the resolver walks the fds of the socket owner's (root's) processes."""
    import socket
    import struct

    from callerid import Connection, Endpoint

    reset = struct.pack("ii", 1, 0)  # SO_LINGER {1, 0}: no TIME_WAIT left for the next phase
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
            with server:
                local, remote = client.getsockname(), client.getpeername()
                conn = Connection(Endpoint(local[0], local[1]), Endpoint(remote[0], remote[1]))
                times: list[int] = []
                wrong = 0
                steps: dict[str, list[float]] = {}
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    r = resolver.resolve(conn)
                    times.append(time.perf_counter_ns() - t0)
                    wrong += r.job_id is not None or r.pid != os.getpid()
                    for st in r.steps:
                        steps.setdefault(st.name, []).append(st.micros)
    return {**summary_ms(times), "wrong": wrong,
            "steps_us": {k: sum(v) / len(v) for k, v in steps.items()}}


# ---------------------------------------------------------------- inside node2: gRPC


def grpc_main(args: argparse.Namespace) -> int:
    import grpc

    from node_agent.auth import (
        METADATA_KEY,
        MungeAuthenticator,
        digest,
        request_credential,
        target_claim,
    )
    from node_agent.client import AgentClient
    from node_agent.dial import target_of
    from node_agent.proto.v1 import agent_pb2 as pb
    from node_agent.proto.v1 import agent_pb2_grpc

    raw: list[Sample] = json.loads(Path(args.sample).read_text())
    reqs = [(pb.CallerIdRequest(connection=pb.Connection(
        src_ip=str(s[0]), src_port=int(s[1]), dst_ip=str(s[2]), dst_port=int(s[3]))), str(s[4]))
        for s in raw]
    target = target_of(args.target, 411)
    auth = MungeAuthenticator(args.munge_socket)
    wrong: list[Json] = []

    def check(variant: str, reply: Any, job: str, req: Any) -> bool:
        if isinstance(reply, Exception):
            got = f"error: {reply}"
        elif reply.outcome != pb.CallerIdReply.FOUND:
            got = f"outcome {pb.CallerIdReply.Outcome.Name(reply.outcome)}"
        else:
            got = reply.job_id
        if got == job:
            return True
        c = req.connection
        wrong.append({"variant": variant, "connection": f"{c.src_ip}:{c.src_port} -> "
                      f"{c.dst_ip}:{c.dst_port}", "expected": job, "got": got})
        return False

    def concurrent(variant: str, issue: Callable[[int, Any], Any]) -> Json:
        calls = [(reqs[i % len(reqs)]) for i in range(args.concurrent)]
        t0 = time.perf_counter()
        futures = [issue(i, req) for i, (req, _job) in enumerate(calls)]
        t_issued = time.perf_counter()
        correct = 0
        for fut, (req, job) in zip(futures, calls, strict=True):
            try:
                reply: Any = fut.result()
            except grpc.RpcError as e:
                reply = e
            correct += check(variant, reply, job, req)
        t_end = time.perf_counter()
        return {"calls": len(calls), "correct": correct, "wall_s": t_end - t0,
                "issue_s": t_issued - t0}

    out: Json = {"target": target}
    with AgentClient(target, auth, timeout=RPC_TIMEOUT) as client:
        client.stub.CallerId(reqs[0][0], timeout=RPC_TIMEOUT)  # connect the channel
        lat: list[int] = []
        seq_correct = 0
        for i in range(args.sequential):
            req, job = reqs[i % len(reqs)]
            t0 = time.perf_counter_ns()
            try:
                reply: Any = client.stub.CallerId(req, timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                reply = e
            lat.append(time.perf_counter_ns() - t0)
            seq_correct += check("sequential", reply, job, req)
        out["sequential"] = {**summary_ms(lat), "correct": seq_correct}
        out["concurrent"] = concurrent(
            "concurrent", lambda _i, req: client.stub.CallerId.future(req, timeout=RPC_TIMEOUT))

    # The same load with credentials minted beforehand: the agent's side alone.
    method = "/" + pb.DESCRIPTOR.services_by_name["NodeAgent"].full_name + "/CallerId"
    t_mint = time.perf_counter()
    # Each bound to its call's request and to this node, as AgentClient mints them.
    claim_target = target_claim(target, "")
    creds = [request_credential(auth, method, claim_target, digest(reqs[i % len(reqs)][0]))
             for i in [*range(args.concurrent), 0]]
    mint_s = time.perf_counter() - t_mint
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = agent_pb2_grpc.NodeAgentStub(channel)
        stub.CallerId(reqs[0][0], timeout=RPC_TIMEOUT, metadata=((METADATA_KEY, creds[-1]),))
        out["preminted"] = {**concurrent("preminted", lambda i, req: stub.CallerId.future(
            req, timeout=RPC_TIMEOUT, metadata=((METADATA_KEY, creds[i]),))), "mint_s": mint_s}
    out["wrong_answers"] = wrong
    print(json.dumps(out))
    return 0


# -------------------------------------------------------------------- on the host


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def other_lab() -> str | None:
    """The state dir of another lab that holds the machine, if any."""
    try:
        owner = json.loads(lab_mod.OWNER_FILE.read_text())
    except (FileNotFoundError, ValueError):
        return None
    other = Path(owner.get("dir") or "/nonexistent") if isinstance(owner, dict) else None
    if other is None or other == LAB_DIR or not (other / "lab.json").exists():
        return None
    return str(other)


def adoptctl(lab: lab_mod.Lab, node: str, *argv: str) -> list[str]:
    return lab.cmd(node, [lab.venv_bin("adoptctl"), *argv])


def run_parallel(cmds: Sequence[list[str]], what: str, timeout: float = 120) -> list[str]:
    """Run commands at once; return the error texts of those that failed."""
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    errors = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"{what}: rc={p.returncode}: {(err or out).strip()}")
    return errors


def start_jobs(lab: lab_mod.Lab, phase: Phase, users: Sequence[str], shared: Path,
               started: list[str]) -> dict[str, Path]:
    njobs = len(users) * JOBS_PER_USER
    per_holder = max(1, round(phase.sockets / phase.processes))
    conns = max(1, round(phase.sockets / 2 / njobs))
    ip4, ip6 = lab.ip("node1", 4), lab.ip("node1", 6)
    outfiles: dict[str, Path] = {}
    cmds = []
    for user in users:
        for k in range(1, JOBS_PER_USER + 1):
            job = f"{phase.name}-{user}-{k}"
            out = shared / f"{job}.conns"
            outfiles[job] = out
            cmds.append(adoptctl(
                lab, "node1", "job", "run", "--id", job, "--user", user, "--cwd", str(shared),
                "--output", str(shared / f"{job}.log"), "--",
                SYSTEM_PYTHON, str(shared / FARM.name), str(out), "--ipv4", ip4, "--ipv6", ip6,
                "--conns", str(conns), "--per-holder", str(per_holder)))
            started.append(job)
    log(f"phase {phase.name}: starting {njobs} jobs ({conns} connections = {2 * conns} "
        f"sockets, {math.ceil(2 * conns / per_holder)} holders of {per_holder} each, per job)")
    errors = run_parallel(cmds, "adoptctl job run")
    if errors:
        raise RuntimeError("\n".join(errors))
    deadline = time.monotonic() + FARM_TIMEOUT
    for job, out in outfiles.items():
        while not out.exists():
            if time.monotonic() > deadline:
                logf = shared / f"{job}.log"
                text = logf.read_text(errors="replace") if logf.exists() else "(no log)"
                raise RuntimeError(f"job {job}: no {out.name} after {FARM_TIMEOUT:.0f} s; "
                                   f"its output:\n{text[-3000:]}")
            time.sleep(0.1)
    return outfiles


def end_jobs(lab: lab_mod.Lab, jobs: list[str]) -> list[str]:
    """End *jobs* with ``adoptctl job end`` (in parallel) and return the errors seen.

    A failed end is not trusted either way: the jobs still registered afterwards are ended
    once more, and if any survives that, RuntimeError. *jobs* is emptied on success.
    """
    if not jobs:
        return []
    errors = run_parallel([adoptctl(lab, "node1", "job", "end", j, "--wait", "20") for j in jobs],
                          "adoptctl job end", timeout=60)
    if errors:
        left = registered(lab, jobs)
        if left:
            errors += run_parallel([adoptctl(lab, "node1", "job", "end", j) for j in left],
                                   "adoptctl job end (retry)", timeout=60)
            left = registered(lab, jobs)
            if left:
                jobs[:] = left
                raise RuntimeError(f"jobs {left} survive `adoptctl job end`:\n"
                                   + "\n".join(errors))
    jobs.clear()
    return errors


def registered(lab: lab_mod.Lab, jobs: Sequence[str]) -> list[str]:
    """Those of *jobs* that node1's registry still lists."""
    r = lab.run("node1", [lab.venv_bin("adoptctl"), "jobs", "--json"])
    ids = {j["id"] for j in json.loads(r.stdout)}
    return [j for j in jobs if j in ids]


def build_sample(outfiles: dict[str, Path], rng: random.Random) -> tuple[list[Sample], int]:
    conns: list[Sample] = []
    for job, path in sorted(outfiles.items()):
        for line in path.read_text().splitlines():
            f = line.split()
            if f[0] != "conn":
                continue
            kind, cip, cport, sip, sport = f[1], f[2], int(f[3]), f[4], int(f[5])
            conns.append([cip, cport, sip, sport, job, kind, "client"])
    picked = rng.sample(conns, min(SAMPLE_SIZE, len(conns)))
    sample: list[Sample] = []
    for c in picked:
        if rng.random() < 0.5:  # the accepting end: the same connection seen from the server
            c = [c[2], c[3], c[0], c[1], c[4], c[5], "server"]
        sample.append(c)
    return sample, len(conns)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_memory(lab: lab_mod.Lab, node: str) -> Json:
    """VmRSS, VmHWM (kB), Threads and CPU seconds of the node's agent."""
    pid = lab.agent_pid(node)
    mem: Json = {"pid": pid, "cpu_s": cpu_seconds(pid)}
    if pid is None:
        return mem
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            parts = value.split()
            mem[key] = int(parts[0])  # kB, or a count for Threads
    return mem


def munged_pid(lab: lab_mod.Lab) -> int | None:
    try:
        return int((lab.dir / "pids" / "munged.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_phase(lab: lab_mod.Lab, phase: Phase, users: Sequence[str], shared: Path,
              started: list[str], rng: random.Random) -> Json:
    t0 = time.monotonic()
    outfiles = start_jobs(lab, phase, users, shared, started)
    log(f"phase {phase.name}: farms ready after {time.monotonic() - t0:.1f} s")
    sample, nconns = build_sample(outfiles, rng)
    mix: dict[str, int] = {}
    for s in sample:  # address kind (v4, v6, dual = ::ffff: on the accepting end) and end
        for key in (str(s[5]), f"{s[6]} end"):
            mix[key] = mix.get(key, 0) + 1
    sample_file = shared / f"sample-{phase.name}.json"
    sample_file.write_text(json.dumps(sample))
    sample_file.chmod(0o644)
    py = lab.venv_bin("python")
    jobs = ",".join(outfiles)
    r = lab.run("node1", [py, str(Path(__file__).resolve()), "measure", str(sample_file), jobs,
                          "--fast", str(SAMPLE_SIZE), "--slow", str(SLOW_SAMPLES)], timeout=600)
    measured = last_json_line(r.stdout)
    st = measured["state"]
    log(f"phase {phase.name}: node1 has {st['tcp_sockets']} TCP sockets, {st['processes']} "
        f"processes ({st['job_processes']} in bench jobs); resolution measured")
    mem_before = agent_memory(lab, "node1")
    munged_before = cpu_seconds(munged_pid(lab))
    r = lab.run("node2", [py, str(Path(__file__).resolve()), "grpc",
                          f"{lab.ip('node1')}:{lab_mod.AGENT_PORT}", str(sample_file),
                          "--concurrent", str(CONCURRENT), "--sequential", str(SEQUENTIAL)],
                timeout=600)
    grpc_out = last_json_line(r.stdout)
    mem_after = agent_memory(lab, "node1")
    grpc_calls = SEQUENTIAL + 2 * CONCURRENT + 2
    grpc_out["server_cpu_ms_per_call"] = {
        "agent": (mem_after["cpu_s"] - mem_before["cpu_s"]) * 1e3 / grpc_calls,
        "munged": (cpu_seconds(munged_pid(lab)) - munged_before) * 1e3 / grpc_calls,
        "calls": grpc_calls}
    log(f"phase {phase.name}: gRPC from node2 done; ending the jobs")
    end_errors = end_jobs(lab, started)
    for err in end_errors:
        log(f"warning: {err}")
    return {"phase": phase.name, "planned_sockets": phase.sockets,
            "planned_processes": phase.processes, "jobs": list(outfiles), "users": list(users),
            "farm_connections": nconns, "sample_size": len(sample), "sample_mix": mix,
            "measure": measured, "grpc": grpc_out, "agent_before": mem_before,
            "agent_after": mem_after, "job_end_errors": end_errors,
            "seconds": time.monotonic() - t0}


# ------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def evaluate(results: list[Json]) -> list[tuple[str, str, bool]]:
    """(target, measured, pass) for phase B, plus correctness over everything."""
    targets: list[tuple[str, str, bool]] = []
    b = next((r for r in results if r["phase"] == "B"), None)
    if b is None:
        return [("phase B ran", "no", False)]
    m = b["measure"]["methods"]
    a50, a99 = m["a"]["p50"], m["a"]["p99"]
    targets.append((f"(a) p50 <= {TARGET_P50_MS} ms at 20k sockets", f"{a50:.3f} ms",
                    a50 <= TARGET_P50_MS))
    targets.append((f"(a) p99 <= {TARGET_P99_MS} ms at 20k sockets", f"{a99:.3f} ms",
                    a99 <= TARGET_P99_MS))
    for other, name in (("b", "Slurm-style"), ("c", "psutil")):
        sp = m[other]["p50"] / a50
        targets.append((f"(a) >= {TARGET_SPEEDUP:.0f}x faster than ({other}) {name} (p50)",
                        f"{sp:,.0f}x", sp >= TARGET_SPEEDUP))
    c = b["grpc"]["concurrent"]
    targets.append((f"{CONCURRENT} concurrent CallerId all correct within "
                    f"{TARGET_CONCURRENT_S:.0f} s",
                    f"{c['correct']}/{c['calls']} in {c['wall_s']:.3f} s",
                    c["correct"] == c["calls"] == CONCURRENT
                    and c["wall_s"] <= TARGET_CONCURRENT_S))
    nwrong = sum(sum(r["measure"]["wrong"].values()) + len(r["grpc"]["wrong_answers"])
                 + r["measure"]["no_job"]["wrong"] for r in results)
    targets.append(("no wrong answer (all methods, all phases, gRPC)", f"{nwrong} wrong",
                    nwrong == 0))
    return targets


def _column(r: Json) -> list[tuple[str, str]]:
    """(row label, this phase's value) for one phase; the labels are the same for all."""
    st = r["measure"]["state"]
    m = r["measure"]["methods"]
    g = r["grpc"]
    out: list[tuple[str, str]] = [
        ("node1, measured", ""),
        ("  TCP sockets (/proc/net/tcp + tcp6 lines)", f"{st['tcp_sockets']:,}"),
        ("  by state", ", ".join(f"{k} {v:,}" for k, v in sorted(st["tcp_states"].items()))),
        ("  processes in node1 / in bench jobs", f"{st['processes']:,} / {st['job_processes']:,}"),
        ("  open fds of node1 processes", f"{st['fds']:,}"),
        ("  jobs x users", f"{len(r['jobs'])} ({JOBS_PER_USER} each of {', '.join(r['users'])})"),
        ("  farm connections / sampled", f"{r['farm_connections']:,} / {r['sample_size']} ("
         + ", ".join(f"{k} {v}" for k, v in sorted(r["sample_mix"].items())) + ")"),
        ("caller ID in node1, ms per call: p50 / p99 / mean [n]", ""),
    ]
    names = {"a": "(a) callerid Resolver.resolve", "b": "(b) resolve_slurm_style",
             "c": "(c) psutil.net_connections"}
    for k, label in names.items():
        out.append((f"  {label}", f"{_fmt(m[k].get('p50'))} / {_fmt(m[k].get('p99'))} / "
                    f"{_fmt(m[k].get('mean'))}  [n={m[k]['n']}]"))
    out.append(("  (a) first call (builds the cgroup-id cache)",
                f"{r['measure']['cold_a_ms']:.3f}"))
    nj = r["measure"]["no_job"]
    out.append((f"  (a) socket of a process in no job [n={nj['n']}]",
                f"{nj['p50']:.3f} / {nj['p99']:.3f} / {nj['mean']:.3f}  (" + ", ".join(
                    f"{k} {v:,.0f} us" for k, v in nj["steps_us"].items()) + ")"))
    for k in ("a", "b", "c"):
        steps = r["measure"]["steps_us"][k]
        out.append((f"  ({k}) mean per step, us",
                    ", ".join(f"{name} {v['mean']:,.1f}" for name, v in steps.items())))
    for k in ("b", "c"):
        out.append((f"  speedup of (a) over ({k}): p50 ratio (mean ratio)",
                    f"{m[k]['p50'] / m['a']['p50']:,.0f}x ({m[k]['mean'] / m['a']['mean']:,.0f}x)"))
    out.append(("  wrong answers (a) / (b) / (c) / (a) no-job",
                " / ".join(str(r["measure"]["wrong"][k]) for k in ("a", "b", "c"))
                + f" / {nj['wrong']}"))
    seq, conc, pre = g["sequential"], g["concurrent"], g["preminted"]
    out += [
        ("CallerId gRPC, node2 -> node1 agent at 10.77.0.11, one MUNGE cred per call", ""),
        (f"  sequential round trip, ms: p50 / p99 / mean [n={seq['n']}]",
         f"{seq['p50']:.3f} / {seq['p99']:.3f} / {seq['mean']:.3f} ({seq['correct']} correct)"),
        (f"  {CONCURRENT} concurrent via AgentClient: wall, correct",
         f"{conc['wall_s']:.3f} s, {conc['correct']}/{conc['calls']} "
         f"(issuing incl. minting {conc['issue_s']:.3f} s)"),
        (f"  {CONCURRENT} concurrent, creds minted before: wall, correct",
         f"{pre['wall_s']:.3f} s, {pre['correct']}/{pre['calls']} "
         f"(issuing {pre['issue_s']:.3f} s; minting before {pre['mint_s']:.3f} s)"),
        (f"  server CPU per call over all {g['server_cpu_ms_per_call']['calls']} calls, ms",
         f"agent {g['server_cpu_ms_per_call']['agent']:.3f}, "
         f"munged {g['server_cpu_ms_per_call']['munged']:.3f}"),
    ]
    for when in ("before", "after"):
        mem = r[f"agent_{when}"]
        out.append((f"  node1 agent VmRSS / VmHWM {when} the gRPC load, MiB",
                    f"{mem.get('VmRSS', 0) / 1024:.1f} / {mem.get('VmHWM', 0) / 1024:.1f} "
                    f"({mem.get('Threads', '?')} threads)"))
    out.append(("`adoptctl job end` calls that failed (then checked gone)",
                f"{len(r['job_end_errors'])} of {len(r['jobs'])}"))
    out.append(("phase wall time (setup, measurements, job end), s", f"{r['seconds']:.1f}"))
    return out


def render(results: list[Json], targets: list[tuple[str, str, bool]], runtime: float) -> str:
    columns = [_column(r) for r in results]
    rows: list[list[str]] = [["", *(f"phase {r['phase']}: ~{r['planned_sockets']:,} sockets, "
                                    f"~{r['planned_processes']:,} holders" for r in results)]]
    for i, (label, _v) in enumerate(columns[0]):
        rows.append([label, *(col[i][1] for col in columns)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["callerid-adopt caller-ID benchmark"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-" * max(len(x) for x in lines))
    lines += ["", "TARGETS (judged on phase B, ~20k sockets)"]
    tw = max(len(t[0]) for t in targets)
    mw = max(len(t[1]) for t in targets)
    for name, measured, ok in targets:
        lines.append(f"  {name.ljust(tw)}  {measured.rjust(mw)}  {'PASS' if ok else 'FAIL'}")
    verdict = "ALL TARGETS PASS" if all(t[2] for t in targets) else "SOME TARGETS FAIL"
    lines += ["", f"{verdict}; total runtime {runtime:.0f} s"]
    return "\n".join(lines)


def print_wrong(results: list[Json]) -> None:
    for r in results:
        for w in r["measure"]["wrong_answers"] + r["grpc"]["wrong_answers"]:
            print(f"WRONG phase {r['phase']}: {json.dumps(w)}")


def host_main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    if os.geteuid() != 0:
        print("bench: needs root (it builds a lab of namespaces and cgroups)", file=sys.stderr)
        return 2
    other = other_lab()
    if other:
        print(f"bench: another lab is up at {other}; bring it down first "
              f"(python3 deploy/lab/lab.py --dir {other} down)", file=sys.stderr)
        return 2
    venv = Path(args.venv) if args.venv else (
        Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv")
    if not os.access(venv / "bin" / "node-agent", os.X_OK):
        print(f"bench: no node-agent in {venv}: run `make venv`", file=sys.stderr)
        return 2
    lab = lab_mod.Lab(LAB_DIR, nodes=2, venv=venv)
    rng = random.Random(args.seed)
    shared = Path(tempfile.mkdtemp(prefix="callerid-bench-"))
    shared.chmod(0o1777)
    shutil.copy(FARM, shared / FARM.name)
    (shared / FARM.name).chmod(0o644)
    started: list[str] = []
    results: list[Json] = []
    failure: str | None = None
    old_int = signal.getsignal(signal.SIGINT)
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        log(f"bringing up the lab at {LAB_DIR}")
        lab.up(agents=True)
        users = []
        for u in USERS:
            try:
                pwd.getpwnam(u)
                users.append(u)
            except KeyError:
                continue
        if len(users) < MIN_USERS:
            raise RuntimeError(f"need at least {MIN_USERS} of the users {USERS}, have {users}")
        for phase in PHASES:
            results.append(run_phase(lab, phase, users, shared, started, rng))
    except KeyboardInterrupt:
        failure = "interrupted"
    except Exception as e:  # report, tear down, exit 2
        failure = f"{type(e).__name__}: {e}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the teardown must not be cut short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for err in end_jobs(lab, started):
                log(f"warning: {err}")
        except Exception as e:
            log(f"warning: ending the jobs: {e} (the lab's down kills what is left)")
        try:
            log("tearing the lab down")
            lab.down()
        except Exception as e:
            log(f"lab teardown failed: {e}")
            failure = failure or f"teardown: {e}"
        shutil.rmtree(shared, ignore_errors=True)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    runtime = time.monotonic() - start
    if failure:
        print(f"bench: {failure}", file=sys.stderr)
        print(f"bench: logs of the lab are in {LAB_DIR}/logs", file=sys.stderr)
        return 130 if failure == "interrupted" else 2
    targets = evaluate(results)
    print_wrong(results)
    print(render(results, targets, runtime))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"runtime_s": runtime, "phases": results,
             "targets": [{"target": t, "measured": m, "pass": ok} for t, m, ok in targets]},
            indent=2) + "\n")
    return 0 if all(ok for _t, _m, ok in targets) else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--venv", help="venv with node-agent (default: the running one, else .venv)")
    p.add_argument("--seed", type=int, default=1, help="sample selection seed")
    sub = p.add_subparsers(dest="mode")
    m = sub.add_parser("measure", help="(internal) resolve a sample inside node1")
    m.add_argument("sample")
    m.add_argument("jobs")
    m.add_argument("--fast", type=int, default=SAMPLE_SIZE)
    m.add_argument("--slow", type=int, default=SLOW_SAMPLES)
    m.add_argument("--config", default=AGENT_CONFIG)
    g = sub.add_parser("grpc", help="(internal) CallerId load from node2")
    g.add_argument("target")
    g.add_argument("sample")
    g.add_argument("--concurrent", type=int, default=CONCURRENT)
    g.add_argument("--sequential", type=int, default=SEQUENTIAL)
    g.add_argument("--munge-socket", default=MUNGE_SOCKET)
    args = p.parse_args(argv)
    if args.mode == "measure":
        return measure_main(args)
    if args.mode == "grpc":
        return grpc_main(args)
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
