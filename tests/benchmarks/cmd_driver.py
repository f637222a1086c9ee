"""Run commands on request and time them (stdlib only; runs inside a lab node as a user).

Reads one JSON argv per line on stdin; for each, runs it (stdin /dev/null, stdout
discarded, stderr kept) and prints one JSON line: {"rc": RC, "ms": MILLISECONDS,
"err": "the last lines of stderr"}. Timing inside the node leaves out what entering the
node costs (sh, nsenter, setpriv, env), which would otherwise be added to every variant.
"""

import json
import subprocess
import sys
import time


def main() -> None:
    for line in sys.stdin:
        argv = json.loads(line)
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        ms = (time.perf_counter() - t0) * 1000
        err = r.stderr.decode(errors="replace").strip().splitlines()[-5:]
        print(json.dumps({"rc": r.returncode, "ms": ms, "err": "\n".join(err)}), flush=True)


if __name__ == "__main__":
    main()
