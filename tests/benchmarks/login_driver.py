"""Run ssh logins on request and time them (stdlib only; runs inside a lab node, in a job).

Reads lines "PORT HOST" on stdin; for each, runs `ssh -p PORT HOST true` and prints
"RC MILLISECONDS" on stdout. The benchmark attaches this process to a job of the
native registry first, so every ssh it starts comes from inside that job.
"""

import subprocess
import sys
import time


def main() -> None:
    for line in sys.stdin:
        port, host = line.split()
        t0 = time.perf_counter()
        rc = subprocess.run(["ssh", "-p", port, host, "true"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        ms = (time.perf_counter() - t0) * 1000
        print(f"{rc} {ms:.3f}", flush=True)


if __name__ == "__main__":
    main()
