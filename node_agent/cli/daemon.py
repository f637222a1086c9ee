"""`node-agent`: the daemon's entry point, the one CLI that imports the daemon (and only
when it runs, so that `--help` and `--version` stay cheap)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from node_agent import __version__
from node_agent import config as config_mod
from node_agent.auth import MungeAuthenticator
from node_agent.cli.common import run


def main(argv: Sequence[str] | None = None) -> int:
    """`node-agent [--config FILE] [--check]`: run the agent (or check its setup); the exit
    status."""
    parser = argparse.ArgumentParser(
        prog="node-agent",
        description="The callerid-adopt node agent: answers caller-ID questions, keeps the "
                    "native job registry, admits ssh logins into jobs (for pam_adopt) and "
                    "serves ssh-to-job sessions. Runs as root, one per compute node.",
    )
    parser.add_argument("--config", default=config_mod.DEFAULT_PATH,
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration and munged, then exit")
    args = parser.parse_args(argv)

    def body() -> int:
        from node_agent.agent import server

        cfg = config_mod.load(args.config)
        logging.basicConfig(
            level=cfg.log_level.upper(), stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.check:
            MungeAuthenticator(cfg.munge.socket, cfg.munge.library).self_test()
            print(f"node-agent: {args.config}: OK")
            return 0
        server.run(cfg)
        return 0

    return run("node-agent", body, sys.stderr)
