"""Locate jobs on request and time each (runs inside a lab node as a user, with the venv's
python): bench_locate.py's driver.

Reads one JSON object per line on stdin, {"config": PATH, "job": ID, "node": NODE or
null, "homes": BOOL}, and for each runs node_agent/cli/locate.py's Locator.locate(ID,
node=NODE) with that configuration and real MUNGE, as the CLIs do (with "homes": false,
a Locator that skips the job's homes: the bare fan-out, for comparison); prints one JSON
line {"ok": BOOL, "ms": MILLISECONDS, "cpu_ms": THIS PROCESS'S CPU, "node": WHERE,
"err": WHY, "via_homes": whether the job's homes found it}. Each locate makes its
channels anew (gRPC's global subchannel pool is turned off for them, so no connection is
reused between two locates), as a fresh ssh-to-job process would; the process itself
stays, so the interpreter's start and imports are left out of the figure: it is the
search alone.
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time
from typing import Any

import grpc

from node_agent import config as config_mod
from node_agent.auth import MungeAuthenticator
from node_agent.cli import locate
from node_agent.cli.common import CliError

_insecure_channel = grpc.insecure_channel


def _fresh_channel(target: str, options: Any = None, *a: Any, **k: Any) -> grpc.Channel:
    return _insecure_channel(target, [*(options or []), ("grpc.use_local_subchannel_pool", 1)],
                             *a, **k)


grpc.insecure_channel = _fresh_channel


class Recording(locate.Locator):
    """The CLIs' Locator, noting whether the job's homes found the job (`via_homes`)."""
    via_homes = False

    def _from_homes(self, job_id: str, nodes: Any) -> Any:
        found = super()._from_homes(job_id, nodes)
        self.via_homes = found is not None
        return found


class FanOutOnly(Recording):
    """The Locator without the job index: every search is the fan-out over `nodes`."""

    def _from_homes(self, job_id: str, nodes: Any) -> None:
        return None


def main() -> None:
    configs: dict[str, config_mod.AgentConfig] = {}
    for line in sys.stdin:
        req = json.loads(line)
        cfg = configs.get(req["config"])
        if cfg is None:
            cfg = configs[req["config"]] = config_mod.load(req["config"])
        auth = MungeAuthenticator(cfg.munge.socket, cfg.munge.library)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        try:
            locator = (Recording if req.get("homes", True) else FanOutOnly)(
                cfg, auth, io.StringIO())
            where = locator.locate(req["job"], node=req["node"])
            ok, node, err = True, where.node, ""
        except (CliError, grpc.RpcError) as e:
            ok, node, err = False, "", str(e)
        ms = (time.perf_counter() - t0) * 1000
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1000
        print(json.dumps({"ok": ok, "ms": ms, "cpu_ms": cpu, "node": node, "err": err,
                          "via_homes": locator.via_homes}),
              flush=True)


if __name__ == "__main__":
    main()
