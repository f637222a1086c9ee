"""The agent's side of node_agent/launch.py: start a process as a job's user, inside
the job's cgroups, and learn whether it got as far as exec.

Used for a job's main process (registry) and for ssh-to-job's `sshd -i` and clean-up
helper (jobshell). The launcher is run with `python -I -S` (stdlib only, no
site-packages: fast, and the environment cannot steer it); it reads the JSON spec from one
pipe and reports any failure before exec on another, which is close-on-exec in the child:
EOF means it exec'd (or, for launch.py's ``remove``, that it is in its cgroups).

The wait for that EOF can be bounded (``timeout``): once the launcher has dropped to the
job's user, that user may stop it (SIGSTOP) before it execs, and an agent thread must not
wait on it for ever.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping

from node_agent import launch

LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin"


class LaunchError(RuntimeError):
    """The launcher could not exec; the message is the launcher's report."""


def start(spec: Mapping[str, object], *, pipes: bool = False,
          pass_fds: Collection[int] = (), timeout: float | None = None,
          enroll: Callable[[int], None] | None = None) -> subprocess.Popen[bytes]:
    """Start the launcher with `spec` (see launch.py); with `pipes`, the process's stdin
    and stdout are pipes to the caller (ssh-to-job), else /dev/null; `pass_fds` are
    inherited (the spec can name them as /proc/self/fd/N). Raises LaunchError when the
    launcher reports a failure before exec, or has not got there within `timeout` seconds
    (it is killed: before exec it has no children); the child has been reaped then.

    `enroll` puts the launcher into the job where the launcher cannot do it itself (a
    scheduler writes its own cgroups: Slurm's slurmstepd, REQUEST_ADD_EXTERN_PID): it is
    called with the launcher's pid while the launcher waits, held, before it touches
    anything (launch.py reads a "go" after the spec); when it raises, the launcher is
    killed unreleased and the error propagates."""
    spec_r, spec_w = os.pipe()
    status_r, status_w = os.pipe()
    stdio = subprocess.PIPE if pipes else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", launch.__file__, str(spec_r), str(status_w)],
            stdin=stdio, stdout=stdio, stderr=subprocess.DEVNULL,
            pass_fds=(spec_r, status_w, *pass_fds), start_new_session=True,
            env={"PATH": LOGIN_PATH},
        )
    finally:
        os.close(spec_r)
        os.close(status_w)
    try:
        # One line of JSON (json.dumps escapes newlines), then the "go": may exceed a
        # pipe's buffer, which the launcher reads meanwhile.
        _write_all(spec_w, json.dumps(spec).encode() + b"\n")
        if enroll is not None:
            enroll(proc.pid)
        _write_all(spec_w, launch.GO)
    except BaseException:
        os.close(spec_w)
        os.close(status_r)
        proc.kill()   # held before anything: it has started nothing
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        raise
    os.close(spec_w)
    try:
        err = _read_status(status_r, timeout)
    except TimeoutError:
        proc.kill()
        err = f"the launcher did not get to exec within {timeout:g} s (killed)"
    finally:
        os.close(status_r)
    if err:
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        raise LaunchError(err)
    return proc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_status(fd: int, timeout: float | None) -> str:
    """What the launcher wrote on its status pipe, until EOF; TimeoutError past `timeout`.
    poll(2), not select(2): an agent with many sessions has fds above FD_SETSIZE."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not poller.poll(left * 1000):
                continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)
