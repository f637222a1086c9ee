"""Start a job's main process: join the job's cgroups, drop to the user, exec.

The agent runs this file with `python -I -S launch.py` (stdlib only, no site-packages,
so it starts fast and cannot be influenced by the environment) instead of using
`preexec_fn`, which is unsafe in the multi-threaded gRPC server:

    python3 -I -S launch.py SPEC_FD STATUS_FD

The spec arrives as JSON on SPEC_FD; anything that goes wrong before exec is written to
STATUS_FD, which is made close-on-exec, so the agent reads EOF on success and a message
on failure.

Order matters: the process writes itself into every cgroup *before* it execs, so the
job's first instruction already runs inside the job, and no child can escape.

Optional spec keys (used by ssh-to-job sessions, `node_agent.jobshell`):
- ``namespaces``: paths like ``/proc/<pid>/ns/net`` to enter with setns(2) after joining
  the cgroups and before dropping privileges (all are opened first, then entered in order);
- ``stdio``: ``"inherit"`` keeps the inherited stdin/stdout (pipes to the agent) and sends
  only stderr to ``output``; the default is stdin from /dev/null, stdout+stderr to ``output``.
"""

from __future__ import annotations

import json
import os
import sys


def _setns(paths: list[str]) -> None:
    import ctypes  # only when asked: keeps the common path's start-up small

    libc = ctypes.CDLL(None, use_errno=True)
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        for path, fd in zip(paths, fds, strict=True):
            if libc.setns(fd, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)


def main() -> None:
    spec_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    try:
        with os.fdopen(spec_fd, "rb") as f:
            spec = json.load(f)
        pid = str(os.getpid())
        for procs in spec["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(pid)
        if spec.get("namespaces"):
            _setns(spec["namespaces"])
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        out = os.open(spec["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if spec.get("stdio") == "inherit":
            os.dup2(out, 2)
            if out > 2:
                os.close(out)
        else:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            for fd in (null, out):
                if fd > 2:
                    os.close(fd)
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:  # report anything, then die without running the job
        try:
            os.write(status_fd, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


if __name__ == "__main__":
    main()
