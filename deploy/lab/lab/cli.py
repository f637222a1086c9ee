"""The lab's command line: ``python3 deploy/lab/lab.py [--name N] [--dir D] COMMAND``
(up, down, status, exec, agent, pam, blackhole, syslog; ``--help`` lists them), and the
internal ``_syslogd FD`` that ``up`` starts as the /dev/log listener.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from .core import Lab
from .errors import LabError
from .instances import DEFAULT_DIR, DEFAULT_NAME
from .network import AGENT_PORT
from .syslog import syslogd

DESCRIPTION = 'The callerid-adopt multi-node lab: N "nodes" on one Linux machine, built from ' \
              "namespaces."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab.py", description=DESCRIPTION)
    p.add_argument("--dir", default=None,
                   help=f"state dir (default $CALLERID_LAB_DIR, else {DEFAULT_DIR} for the "
                        f"lab {DEFAULT_NAME}, /run/NAME for others)")
    p.add_argument("--name", default=None,
                   help=f"lab instance name (default {DEFAULT_NAME}, or the one in --dir)")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab (rebuilds one already up in --dir)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--venv", default=None, help="venv holding node-agent (default <repo>/.venv)")
    up.add_argument("--no-agents", action="store_true")
    up.add_argument("--no-sshd", action="store_true")
    up.add_argument("--slurm", action="store_true",
                    help="also run Slurm: slurmctld on the head, slurmd -N NODE per node")
    down = sub.add_parser("down", help="tear everything down (idempotent)")
    down.add_argument("--purge", action="store_true", help="remove the logs and the dir too")
    sub.add_parser("status", help="nodes, addresses, daemons alive?")
    ex = sub.add_parser("exec", help="run a command inside a node; exit status is its own")
    ex.add_argument("node")
    ex.add_argument("--user", default=None)
    ex.add_argument("--env", action="append", default=[], metavar="K=V")
    ex.add_argument("--cwd", default=None)
    ex.add_argument("argv", nargs="*", metavar="CMD", help="after --: the command and its args")
    ag = sub.add_parser("agent", help="start|stop|kill|restart a node's agent")
    ag.add_argument("node")
    ag.add_argument("action", choices=["start", "stop", "kill", "restart"])
    pam = sub.add_parser("pam", help="set the account module of a node's lab-sshd-NODE "
                                     "(port 22) and its options")
    pam.add_argument("node")
    pam.add_argument("--module", choices=["adopt", "slurm"], default="adopt",
                     help="pam_adopt (default) or pam_slurm_adopt (a lab up with --slurm)")
    pam.add_argument("options", nargs="*", metavar="KEY=VALUE")
    bh = sub.add_parser("blackhole", help="drop (on) or stop dropping (off) TCP to a port")
    bh.add_argument("node")
    bh.add_argument("action", choices=["on", "off"])
    bh.add_argument("--port", type=int, default=AGENT_PORT)
    sub.add_parser("syslog", help="print what the lab's /dev/log listener got")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command of `exec`, options included.
    tail: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    p = _parser()
    args = p.parse_args(argv)
    if tail is not None:
        if args.command != "exec":
            p.error("'--' only separates the command of exec")
        args.argv = list(args.argv) + tail
    return args


def _down(lab: Lab, args: argparse.Namespace) -> None:
    lab.down(purge=args.purge)


def _status(lab: Lab, args: argparse.Namespace) -> None:
    print(json.dumps(lab.status(), indent=2))


def _exec(lab: Lab, args: argparse.Namespace) -> None:
    """Replace this process with the command inside the node: its exit status is ours."""
    cmd = args.argv
    if not cmd:
        raise LabError("exec: no command given (lab.py exec NODE -- CMD...)")
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep:
            raise LabError(f"--env wants K=V, not {kv!r}")
        env[k] = v
    Lab._require_root()
    full = lab.cmd(args.node, cmd, user=args.user, env=env, cwd=args.cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(full[0], full)


def _agent(lab: Lab, args: argparse.Namespace) -> None:
    if args.action in ("stop", "restart"):
        lab.agent_stop(args.node)
    elif args.action == "kill":
        lab.agent_stop(args.node, signal.SIGKILL)
    if args.action in ("start", "restart"):
        lab.agent_start(args.node)


def _pam(lab: Lab, args: argparse.Namespace) -> None:
    lab.set_pam_module(args.node, args.module, args.options)


def _blackhole(lab: Lab, args: argparse.Namespace) -> None:
    lab.blackhole(args.node, args.port, args.action == "on")


def _syslog(lab: Lab, args: argparse.Namespace) -> None:
    sys.stdout.write(lab.syslog())


#: The commands on a lab that exists (``up`` makes one, see main).
COMMANDS: dict[str, Callable[[Lab, argparse.Namespace], None]] = {
    "down": _down, "status": _status, "exec": _exec, "agent": _agent, "pam": _pam,
    "blackhole": _blackhole, "syslog": _syslog,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_syslogd"]:  # internal: the /dev/log listener started by up
        return syslogd(int(argv[1]))
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="lab: %(message)s", stream=sys.stderr)
    try:
        if args.command == "up":
            Lab(args.dir, args.nodes, args.venv, name=args.name or DEFAULT_NAME).up(
                agents=not args.no_agents, sshd=not args.no_sshd, slurm=args.slurm)
        else:
            COMMANDS[args.command](Lab.load(args.dir, args.name), args)
        return 0
    except (LabError, ValueError, KeyError) as e:
        print(f"lab.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
