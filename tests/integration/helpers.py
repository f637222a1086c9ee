"""Small helpers shared by the integration tests (the lab itself is deploy/lab/lab.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def adoptctl(lab: Any, node: str, *argv: str, user: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `adoptctl ARGV...` inside a lab node (as root unless `user`)."""
    result: subprocess.CompletedProcess[str] = lab.run(
        node, [lab.venv_bin("adoptctl"), *argv], user=user, check=check)
    return result


def node_sh(lab: Any, script: str, user: str | None = None, check: bool = True,
            node: str = "node1") -> str:
    """Run a shell script in a node (node1 by default, as root unless `user`); its stdout."""
    out: str = lab.run(node, ["sh", "-c", script], user=user, check=check).stdout
    return out


def start_sleeping_job(lab: Any, job_id: str, argv: list[str], *opts: str,
                       user: str = "alice") -> int:
    """Start a job on node1 whose command ends by exec'ing sleep (after setting up its
    namespaces and mounts); wait until it has; its main pid. `opts` go to `job run`."""
    adoptctl(lab, "node1", "job", "run", "--id", job_id, "--user", user, *opts, "--", *argv)
    pid = int(json.loads(adoptctl(lab, "node1", "job", "show", job_id, "--json").stdout)[0]
              ["main_pid"])
    deadline = time.monotonic() + 20
    while node_sh(lab, f"cat /proc/{pid}/comm").strip() != "sleep":
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: main process never reached sleep")
        time.sleep(0.05)
    return pid


def wait_for(path: Path, timeout: float = 20.0) -> None:
    """Wait until a file a lab process writes appears."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (a killed process may linger as one
    until pid 1 reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@dataclass(frozen=True)
class BurstLogin:
    """One login of a burst: where it came from, in which job, what it printed."""

    src: str
    job: str
    out: str
    err: str


def login_burst(lab: Any, work: Path, jobs: Mapping[str, str], per: int,
                argv_to: Callable[[str], list[str]],
                timeout: float = 300) -> tuple[float, list[BurstLogin]]:
    """From each of node1 and node2 to the other, inside each job of `jobs` (id -> user,
    already running on both nodes), start `per` logins (`argv_to(destination)`) at once,
    all released together. `work` must be readable by the lab users. Returns the seconds
    from the release to the last exit, and every login. AssertionError if any hangs."""
    script = work / "burst.sh"
    script.write_text('read go\nout=$1; shift\n'
                      f'for i in $(seq {per}); do "$@" > $out/$i.out 2> $out/$i.err & done\n'
                      "wait\n")
    script.chmod(0o755)
    procs = []
    for src, dst in (("node1", "node2"), ("node2", "node1")):
        for job, user in jobs.items():
            out = work / f"burst-{src}-{job}"
            out.mkdir(exist_ok=True)
            out.chmod(0o777)
            p = lab.popen(src, ["/bin/sh", str(script), str(out), *argv_to(dst)], user=user,
                          stdin=subprocess.PIPE, text=True)
            adoptctl(lab, src, "job", "attach", job, str(p.pid))
            procs.append((src, job, out, p))
    t0 = time.monotonic()
    threads = [threading.Thread(target=p.communicate, args=("go\n",)) for *_x, p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "logins hung"
    elapsed = time.monotonic() - t0
    return elapsed, [BurstLogin(src, job, (out / f"{i}.out").read_text(),
                                (out / f"{i}.err").read_text())
                     for src, job, out, _p in procs for i in range(1, per + 1)]


class Tmux:
    """A private tmux server of `user` in `node`; panes stay after their command exits
    (remain-on-exit), so the last screen can still be read."""

    def __init__(self, lab: Any, node: str, user: str, where: Path) -> None:
        self.lab, self.node, self.user = lab, node, user
        where.mkdir(mode=0o777, exist_ok=True)
        where.chmod(0o777)
        self.sock = str(where / "tmux.sock")
        conf = where / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 5000\n")
        conf.chmod(0o644)
        self.conf = str(conf)

    def tmux(self, *argv: str, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.lab.run(
            self.node, ["tmux", "-f", self.conf, "-S", self.sock, *argv], user=self.user,
            env=env)
        return result

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.tmux("new-session", "-d", "-x", "160", "-y", "50", shlex.join(argv), env=env)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "0", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "0", "-S", "-5000").stdout

    def wait(self, what: Callable[[], Any], timeout: float = 30.0, why: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {why or what}; screen:\n{self.screen()}")

    def kill(self) -> None:
        self.lab.run(self.node, ["tmux", "-S", self.sock, "kill-server"], user=self.user,
                     check=False)
