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
  only stderr to ``output``; the default is stdin from /dev/null, stdout+stderr to ``output``;
- ``session``: ``{"dir": D, "bases": [...], "files": [[name, mode, text], ...]}``, for a job
  whose mount namespace does not show the agent's session directory D. After setns and
  after dropping privileges (so no path of the job's view is ever resolved as root), make
  ``<base>/<name of D>`` (0700) in the first base that takes it, write the files there and
  put that directory in place of D in the files, ``argv``, ``env`` and ``output``. A base
  is skipped unless the path needs no quoting (sshd_config, sh) and only root or the user
  can rename entries of the base (not writable by others, or sticky);
- ``remove``: with ``session``, remove that directory (in each base) instead, and exit 0
  without exec'ing anything: the agent's clean-up of such a session.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys

TYPE_CHECKING = False   # typing costs 4 ms at start-up; mypy reads this as true
if TYPE_CHECKING:
    from typing import Any

_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9_.+-]+)+")


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


def _session_dirs(session: dict[str, Any], uid: int) -> list[str]:
    out = []
    for base in session["bases"]:
        path = os.path.join(base, os.path.basename(session["dir"]))
        try:
            st = os.stat(base)
        except OSError:
            continue
        if _PLAIN_PATH.fullmatch(path) and st.st_uid in (0, uid) and \
                (not st.st_mode & 0o022 or st.st_mode & stat.S_ISVTX):
            out.append(path)
    return out


def materialize(spec: dict[str, Any]) -> None:
    """Make the session directory in this process's view (see ``session``); edits spec."""
    session, old = spec["session"], spec["session"]["dir"]
    for path in _session_dirs(session, spec["uid"]):
        try:
            os.mkdir(path, 0o700)
            break
        except OSError:
            continue
    else:
        raise OSError(f"no directory for the session files in the job's mount namespace "
                      f"(tried {', '.join(session['bases'])})")
    for name, mode, text in session["files"]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(os.path.join(path, name), flags, mode), "w") as f:
            f.write(text.replace(old, path))
    spec["argv"] = [a.replace(old, path) for a in spec["argv"]]
    spec["env"] = {k: v.replace(old, path) for k, v in spec["env"].items()}
    spec["output"] = spec["output"].replace(old, path)


def remove(spec: dict[str, Any]) -> None:
    """Remove what :func:`materialize` made (rmtree does not follow symlinks)."""
    import shutil

    for path in _session_dirs(spec["session"], spec["uid"]):
        shutil.rmtree(path, ignore_errors=True)


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
        if spec.get("remove"):
            remove(spec)
            os._exit(0)
        if spec.get("session"):
            materialize(spec)
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
