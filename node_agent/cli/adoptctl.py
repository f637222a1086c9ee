"""`adoptctl`: the jobs of a node (run, attach and end them on the native registry) and
caller ID, from the command line.

A thin `main(argv)` over node_agent.client; errors go through the CLIs' one handler
(node_agent.cli.common).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from callerid import Connection, Endpoint
from node_agent import __version__, dial
from node_agent import config as config_mod
from node_agent.auth import Authenticator, MungeAuthenticator
from node_agent.cli import locate as locate_mod
from node_agent.cli.common import EXIT_FAILURE, CliError, UsageError, run
from node_agent.client import AgentClient
from node_agent.proto.v1 import agent_pb2 as pb

# -- adoptctl -----------------------------------------------------------------------------

ADOPTCTL_EPILOG = """\
examples:
  adoptctl jobs
  adoptctl jobs --all                               # your jobs on every node of `nodes`
  adoptctl job run --id 42 --user alice -- mpirun ./a.out
  adoptctl job end 42
  adoptctl whois 10.0.0.11:41234 10.0.0.12:22      # which job on 10.0.0.11 owns it?

whois is the equivalent of Slurm's `scontrol callerid`: give the connection as the
destination sees it (SSH_CONNECTION order: source address and port, then destination);
the agent on the source node answers, or the one given with --node.
"""


def _client(args: argparse.Namespace, cfg: config_mod.AgentConfig,
            node: str | None = None, auth: Authenticator | None = None) -> AgentClient:
    auth = auth or MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
    return AgentClient(dial.agent_target(cfg, node or args.agent), auth,
                       timeout=args.timeout, local_node=cfg.node_name)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _ref(j: pb.Job, node: str) -> str:
    # JOB@NODE: what ssh-to-job and adoptctl take to skip the search (node_agent/cli/locate.py)
    return locate_mod.format_ref(j.id, j.node or node)


def _print_jobs(reply: pb.ListJobsReply | Sequence[pb.ListJobsReply], out: TextIO,
                as_json: bool) -> None:
    replies = [reply] if isinstance(reply, pb.ListJobsReply) else list(reply)
    jobs = [(j, _ref(j, r.node)) for r in replies for j in r.jobs]
    if as_json:
        json.dump([{"id": j.id, "ref": ref, "user": j.user, "uid": j.uid, "state": j.state,
                    "main_pid": j.main_pid or None, "start_time": j.start_time,
                    "node": j.node, "cgroups": list(j.cgroups), "pids": list(j.pids)}
                   for j, ref in jobs], out, indent=2)
        out.write("\n")
        return
    rows = [("JOBID", "USER", "STATE", "MAIN_PID", "NPROCS", "STARTED")]
    for j, ref in jobs:
        rows.append((ref, j.user, j.state, str(j.main_pid or "-"), str(len(j.pids)),
                     _fmt_time(j.start_time)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _print_whois(reply: pb.CallerIdReply, src: Endpoint, dst: Endpoint, asked: str,
                 out: TextIO, as_json: bool) -> None:
    found = reply.outcome == pb.CallerIdReply.FOUND
    if as_json:
        json.dump({"connection": {"src": str(src), "dst": str(dst)}, "node": reply.node,
                   "asked": asked, "found": found, "job_id": reply.job_id or None,
                   "user": reply.user or None, "uid": reply.uid if found else None,
                   "pid": reply.pid or None, "method": reply.method,
                   "steps": [{"name": s.name, "detail": s.detail, "micros": s.micros}
                             for s in reply.steps]}, out, indent=2)
        out.write("\n")
        return
    out.write(f"connection  {src} -> {dst}\n")
    out.write(f"asked       {reply.node or '?'} ({asked})\n")
    if found:
        out.write(f"job         {reply.job_id}\n")
        out.write(f"user        {reply.user} (uid {reply.uid})\n")
    else:
        out.write("job         unknown (no such connection, not in a job, or not yours)\n")
    out.write(f"pid         {reply.pid or 'unknown'}\n")
    out.write(f"method      {reply.method}\n")
    if reply.steps:
        out.write("steps\n")
        width = max(len(s.name) for s in reply.steps)
        for s in reply.steps:
            out.write(f"  {s.name.ljust(width)}  {s.detail}  ({s.micros:.1f} us)\n")


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env expects NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def adoptctl_parser() -> argparse.ArgumentParser:
    """The command line of `adoptctl` and its subcommands."""
    p = argparse.ArgumentParser(
        prog="adoptctl",
        description="Talk to the callerid-adopt node agent: jobs of the native registry, "
                    "and which job owns a connection.",
        epilog=ADOPTCTL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="agent configuration to read the socket, port and MUNGE "
                   f"socket from (default: ${config_mod.ENV_VAR}, then {config_mod.DEFAULT_PATH})")
    p.add_argument("--agent", metavar="TARGET",
                   help="agent to ask: unix:/path, HOST or HOST:PORT (default: this node's)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="deadline of each call in seconds (default: %(default)s)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    jobs = sub.add_parser("jobs", help="list the jobs on the node (JOBID as JOB@NODE)",
                          description="List the jobs of this node's agent (or --agent's), or "
                          "with --all of every node in the configuration's `nodes`: yours, or "
                          "everyone's for root and admin_uids. JOBID is JOB@NODE, which "
                          "ssh-to-job takes without searching.")
    jobs.add_argument("--user", default="", help="only this user's jobs")
    jobs.add_argument("--all", action="store_true",
                      help="ask every node of `nodes` (locate_parallel at a time, each within "
                      "locate_timeout); exit status 1 when a node did not answer")
    jobs.add_argument("--json", action="store_true")

    job = sub.add_parser("job", help="manage jobs of the native registry (root)")
    jsub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    run = jsub.add_parser("run", help="create the job and start CMD as USER inside it",
                          description="Create job ID (its cgroups on this node) and start CMD as "
                          "USER inside it. The job ends when CMD exits, or with `adoptctl job "
                          "end`. The same ID may run on several nodes.")
    start = jsub.add_parser("start", help="create the job without a command (scheduler prolog); "
                            "attach processes with `adoptctl job attach`")
    for sp in (run, start):
        sp.add_argument("--id", required=True, dest="job_id", help="job id")
        sp.add_argument("--user", required=True, help="the job's user")
    run.add_argument("--cwd", default="", help="working directory (default: the user's home)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for CMD (repeatable)")
    run.add_argument("--output", default="", metavar="FILE",
                     help="file for CMD's stdout and stderr, opened as USER (default: /dev/null)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    attach = jsub.add_parser("attach", help="move a process (and its future children) into a job")
    attach.add_argument("job_id", metavar="ID")
    attach.add_argument("pid", type=int)
    end = jsub.add_parser("end", help="kill every process of the job, remove its cgroups")
    end.add_argument("job_id", metavar="ID", help="ID, or ID@NODE to ask NODE's agent")
    end.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                     help="how long to wait for the processes to die (default: %(default)s)")
    show = jsub.add_parser("show", help="one job, with its processes and cgroups")
    show.add_argument("job_id", metavar="ID", help="ID, or ID@NODE to ask NODE's agent")
    show.add_argument("--json", action="store_true")

    whois = sub.add_parser("whois", help="which job owns a TCP connection (scontrol callerid)",
                           description="Ask the agent on the source node which job owns the "
                           "connection SRC -> DST (as in SSH_CONNECTION), and how it found out.")
    whois.add_argument("src", metavar="SRC_IP:PORT",
                       help="the connecting side (IPv6 as [addr]:port)")
    whois.add_argument("dst", metavar="DST_IP:PORT", help="the accepting side")
    whois.add_argument("--node", metavar="HOST",
                       help="ask this node's agent (default: the agent at SRC_IP)")
    whois.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
                  err: TextIO | None = None, authenticator: Authenticator | None = None) -> int:
    """`adoptctl`; tests pass argv, streams and a fake authenticator."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = adoptctl_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def body() -> int:
        cfg = config_mod.find(args.config)
        if args.command == "jobs" and args.all:
            auth = authenticator or MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
            found = locate_mod.Locator(cfg, auth, err, prog="adoptctl").list_all(
                user=args.user, with_pids=True)
            _print_jobs([found.replies[n] for n in cfg.node_names() if n in found.replies],
                        out, args.json)
            if found.unanswered:
                out.flush()
                raise CliError("Incomplete", "no answer from "
                               + locate_mod.describe_unanswered(found.unanswered))
            return 0
        if args.command == "jobs":
            with _client(args, cfg, auth=authenticator) as c:
                _print_jobs(c.list_jobs(user=args.user, with_pids=True), out, args.json)
            return 0
        if args.command == "whois":
            try:
                src, dst = Endpoint.parse(args.src), Endpoint.parse(args.dst)
            except ValueError as e:
                raise UsageError(str(e)) from None
            node = args.node or (f"[{src.ip}]" if src.ip.version == 6 else str(src.ip))
            with _client(args, cfg, node=node, auth=authenticator) as c:
                reply = c.whois(Connection.from_ssh_connection(src, dst))
                _print_whois(reply, src, dst, c.target, out, args.json)
            return 0 if reply.outcome == pb.CallerIdReply.FOUND else EXIT_FAILURE
        # job ...
        jc = args.job_command
        node = None
        if jc in ("end", "show"):  # JOB@NODE (as `adoptctl jobs` prints it): that node's agent
            ref = locate_mod.parse_ref(args.job_id)
            if ref.node and args.agent:
                raise UsageError(f"{args.job_id} names its node: leave out --agent")
            args.job_id, node = ref.job_id, ref.node
        with _client(args, cfg, node=node, auth=authenticator) as c:
            if jc in ("run", "start"):
                cmd = list(getattr(args, "cmd", []) or [])
                if cmd and cmd[0] == "--":
                    cmd = cmd[1:]
                if jc == "run" and not cmd:
                    raise UsageError("job run needs a command after --")
                j = c.start_job(args.job_id, args.user, cmd,
                                cwd=getattr(args, "cwd", ""),
                                env=_parse_env(getattr(args, "env", [])),
                                output=getattr(args, "output", ""))
                what = f"main pid {j.main_pid}: {shlex.join(cmd)}" if cmd else "no command"
                out.write(f"job {j.id} of {j.user} started on {j.node} ({_ref(j, j.node)}), "
                          f"{what}\n")
            elif jc == "attach":
                j = c.attach(args.job_id, args.pid)
                out.write(f"pid {args.pid} attached to job {j.id} on {j.node}\n")
            elif jc == "end":
                ended = c.end_job(args.job_id, timeout=args.wait)
                out.write(f"job {ended.job.id} ended on {ended.job.node}: "
                          f"{ended.killed} process{'' if ended.killed == 1 else 'es'} killed\n")
            elif jc == "show":
                listing = c.list_jobs(job_id=args.job_id, with_pids=True)
                if not listing.jobs:
                    raise CliError("Not found", f"no job {args.job_id} on {listing.node} "
                                   "(or not yours)")
                if args.json:
                    _print_jobs(listing, out, True)
                else:
                    j = listing.jobs[0]
                    out.write(f"job         {j.id}\nuser        {j.user} (uid {j.uid})\n"
                              f"node        {j.node}\nstate       {j.state}\n"
                              f"started     {_fmt_time(j.start_time)}\n"
                              f"main pid    {j.main_pid or '-'}\n"
                              f"pids        {' '.join(map(str, j.pids)) or '-'}\n")
                    for cg in j.cgroups:
                        out.write(f"cgroup      {cg}\n")
        return 0

    return run("adoptctl", body, err)
