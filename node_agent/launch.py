"""Start a process for a job (its main process, a session's sshd, or a session's clean-up
helper): join the job's cgroups, enter its namespaces, drop to the user, exec.

The agent runs this file with `python -I -S launch.py` (stdlib only, no site-packages,
so it starts fast and cannot be influenced by the environment) instead of using
`preexec_fn`, which is unsafe in the multi-threaded gRPC server:

    python3 -I -S launch.py SPEC_FD STATUS_FD

The spec arrives as one line of JSON on SPEC_FD, followed by a "go" (`GO`): the agent
may hold the launcher between the two while it has a scheduler put the launcher's pid
into the job (spawn.start's ``enroll``); EOF instead of the "go" ends the launcher before
it has done anything. Anything that goes wrong before exec is written to STATUS_FD, which
is made close-on-exec, so the agent reads EOF on success and a message on failure.

Order matters: the process writes itself into every cgroup *before* it enters a
namespace, drops privileges or execs, so the job's first instruction already runs inside
the job, no child can escape, and nothing it does after touching the job's view runs
outside a cgroup the agent can kill as a whole.

Optional spec keys (used by ssh-to-job sessions, `node_agent.agent.sessions`):
- ``namespaces``: paths like ``/proc/<pid>/ns/net`` to enter with setns(2) after joining
  the cgroups and before dropping privileges (all are opened first, then entered in order);
- ``reaper``: fork after joining the cgroups, the parent staying (root, in the agent's
  namespaces) until everything the exec'd process started has ended, and SIGKILLing what
  is left once that process exits (:func:`_fork_reaper`): the tree of a session that has
  no cgroup of its own to be killed as a whole. The agent's child is then that parent;
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
  without exec'ing anything: the agent's clean-up of such a session. STATUS_FD is closed as
  soon as the cgroups are joined: from then on the agent bounds the helper with its own
  timeout and kills its cgroup, and the exit status (0, or 1 when entering the namespaces or
  dropping privileges failed) is all it learns.

Nothing is imported after the job's namespaces are entered. A job that has its own mount
namespace controls every path in it, the standard library's directory included (a user
namespace lets it bind-mount its own ``shutil.py`` over the real one), so a module imported
there would run the job's code in a process the agent started for its own purposes: a
clean-up helper for a job that has already ended runs outside the job's cgroups. So what
this file needs is imported at its top (``ctypes`` only when there are namespaces to enter,
before entering them), the directory removal uses ``os`` alone, and the import machinery
is emptied (``sys.meta_path`` and friends) just before setns: a forgotten lazy import then
fails, and is reported, instead of running anything.
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

#: What the agent writes after the spec to let the launcher go on (module docstring).
GO = b"g"

_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9_.+-]+)+")


def _enter_namespaces(paths: list[str]) -> None:
    """setns(2) into each of *paths* in order (all opened first). ctypes is imported here,
    before anything is entered; after this returns, nothing can be imported any more."""
    if not paths:
        _no_more_imports()
        return
    import ctypes  # only when asked: keeps the common path's start-up small

    libc = ctypes.CDLL(None, use_errno=True)
    setns, get_errno = libc.setns, ctypes.get_errno
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    _no_more_imports()
    try:
        for path, fd in zip(paths, fds, strict=True):
            if setns(fd, 0) != 0:
                err = get_errno()
                raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)


def _no_more_imports() -> None:
    """Make every later import fail: from here on, paths may be the job's (module doc).
    Modules already loaded stay usable."""
    sys.meta_path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.path.clear()


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
        with os.fdopen(os.open(os.path.join(path, name), flags, mode), "w",
                       encoding="utf-8") as f:   # a codec already loaded: no lookup
            f.write(text.replace(old, path))
    spec["argv"] = [a.replace(old, path) for a in spec["argv"]]
    spec["env"] = {k: v.replace(old, path) for k, v in spec["env"].items()}
    spec["output"] = spec["output"].replace(old, path)


def remove(spec: dict[str, Any]) -> None:
    """Remove what :func:`materialize` made, with ``os`` alone (see the module doc)."""
    for path in _session_dirs(spec["session"], spec["uid"]):
        _rmtree(path)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DEPTH = 64   # the user may nest directories without end; what is deeper stays


def _rmtree(path: str) -> None:
    """Remove the directory *path* and what is in it, never following a symlink: the job's
    user controls the tree (it can swap a directory for a symlink at any time), so every
    directory is opened with O_NOFOLLOW and its entries removed relative to that fd. Errors
    are skipped: the directory is the user's own, in the user's view."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    try:
        _clear(fd, 0)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _clear(dir_fd: int, depth: int) -> None:
    try:
        entries = list(os.scandir(dir_fd))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if depth >= _MAX_DEPTH:
                    continue
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _clear(sub, depth + 1)
                finally:
                    os.close(sub)
                os.rmdir(entry.name, dir_fd=dir_fd)
            else:
                os.unlink(entry.name, dir_fd=dir_fd)
        except OSError:
            continue   # Race: the user changed the entry meanwhile; it stays


def main() -> None:
    """Run the spec read from fd argv[1], report on fd argv[2], exec (see the module
    docstring)."""
    spec_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    try:
        with os.fdopen(spec_fd, "rb") as f:
            spec = json.loads(f.readline())
            if f.read(len(GO)) != GO:
                raise RuntimeError("the agent did not release the launcher (it could not "
                                   "put it into the job)")
        pid = str(os.getpid())
        for procs in spec["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(pid)
        if spec.get("remove"):
            os.close(status_fd)   # in its cgroups: the agent's timeout takes over
            status_fd = -1
            _remove_as_user(spec)
        if spec.get("reaper"):
            _fork_reaper(status_fd)
        if spec.get("namespaces"):
            _enter_namespaces(spec["namespaces"])
        else:
            _no_more_imports()
        _drop_privileges(spec)
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
        _exec(spec["argv"], spec["env"])
    except BaseException as e:  # report anything, then die without running the job
        try:
            if status_fd >= 0:
                os.write(status_fd, f"{type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(127)


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """execvpe(3) by hand: os.execvpe imports ``warnings`` on its way (get_exec_path),
    which can no longer be imported here. As execvp, a name without a slash is looked
    for in *env*'s PATH, and a path found but refused (EACCES) is reported over a later
    "not found"."""
    if "/" in argv[0]:
        os.execve(argv[0], argv, env)
    refused: OSError | None = None
    for d in env.get("PATH", os.defpath).split(":"):
        try:
            os.execve(os.path.join(d or ".", argv[0]), argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            refused = refused or e
    raise refused or FileNotFoundError(2, "No such file or directory in PATH", argv[0])


PR_SET_CHILD_SUBREAPER = 36   # <linux/prctl.h>


def _fork_reaper(status_fd: int) -> None:
    """The ``reaper`` key: stay, as the parent of what is exec'd, until the whole tree has
    ended. Returns in the child, which goes on to exec; the parent never returns.

    For a session that has no cgroup of its own (Slurm: the job's extern step is shared
    with adopted logins and other sessions), the parent marks its tree: as a child
    subreaper it inherits every process of the tree that is orphaned (a double fork, a
    daemon, ``setsid``), so the tree is everything the session started. When the exec'd
    process (sshd) exits, the parent SIGKILLs what is left of the tree and exits with
    sshd's status. It stays root, in the agent's namespaces (it forks before they are
    entered), so the job's user can neither signal nor trace it; it holds none of the
    session's pipes."""
    import ctypes  # only here: only such sessions pay for it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    child = os.fork()
    if child == 0:
        return
    try:
        os.close(status_fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
    status = 0
    child_done = False
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            status, child_done = st, True
        if child_done:
            _kill_children()
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status)
             else 128 + os.WTERMSIG(status))


def _kill_children() -> None:
    """SIGKILL this process's children (those of a subreaper: its orphans too)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _drop_privileges(spec: dict[str, Any]) -> None:
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])


def _remove_as_user(spec: dict[str, Any]) -> None:
    """The ``remove`` helper: enter, drop privileges, remove, exit (0; 1 when it could not
    enter or drop privileges). Never returns."""
    try:
        _enter_namespaces(spec.get("namespaces") or [])
        _drop_privileges(spec)
    except BaseException:
        os._exit(1)
    try:
        remove(spec)
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
