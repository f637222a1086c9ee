"""Real Slurm in the lab (``up(slurm=True)``, ``lab.py up --slurm``): Debian's Slurm 22.05
(bookworm's slurm-wlm) with slurmctld in the head network namespace and one
``slurmd -N <node>`` in each node, sharing the lab's munged. ``Slurm`` is the daemon kind;
``SlurmMixin`` the Lab's methods (``slurm_pid``, ``slurm_config``, ...).

What the lab writes (all in ``DIR/slurm/``; the host's /etc/slurm is never written):

* ``etc/slurm.conf`` and ``etc/cgroup.conf``, bound over /etc/slurm in every node (and in
  slurmctld's own mount namespace), so that the daemons, the users' ``sbatch``/``salloc``/
  ``srun``/``squeue`` and pam_slurm_adopt (which reads /etc/slurm/slurm.conf from inside
  sshd, whose environment is clean) all see it with no SLURM_CONF;
* ``state/`` (StateSaveLocation) and ``spool/<node>/`` (``SlurmdSpoolDir=.../%n``: the
  stepd sockets ``<node>_<job>.<step>``); pid files in ``run/``; logs in ``DIR/logs/``
  (``slurmctld.log``, ``slurmd-<node>.log``, and the daemons' stdout/stderr in ``*.out``).

The configuration is the one SLURM-NOTES.md records as working on these machines:
``ProctrackType=proctrack/cgroup``, ``PrologFlags=contain`` (an extern step for every
job, which pam_slurm_adopt adopts into), ``TaskPlugin=task/none``; plus
``JobAcctGatherType=jobacct_gather/linux`` (``JobAcctGatherFrequency=task=1``), so that
the stepds account for their processes, adopted ones included, and ``sstat`` shows a
running step's figures (there is no slurmdbd: ``AccountingStorageType=accounting_storage/none``,
finished steps' figures are not kept); cgroup.conf ``CgroupPlugin=cgroup/v1``,
``CgroupAutomount=no`` and every ``Constrain*=no``, so that Slurm uses only the v1 freezer
hierarchy (never memory). slurmd runs in its node's cgroup namespace, rooted at
``<freezer>/NAME/<node>``: the ``/slurm_<node>/uid_<uid>/job_<id>/step_<step>`` groups it
makes (``slurm_<node>``: Debian builds Slurm with multiple-slurmd support) land inside the
lab's subtree on the host, and ``down`` kills and removes them with the rest of it.

``SlurmUser=root``: slurmd and slurmstepd run as root whatever this says (they setuid to
the job's user per task), and the lab is root-only; a SlurmUser ``slurm`` would only make
slurmctld need its state and log files chowned in the lab dir, and would add an identity
(besides root) that the stepd's REQUEST_ADD_EXTERN_PID accepts. Root is what a
single-admin test cluster runs, and the agent, like pam_slurm_adopt, runs as root anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .daemons import DaemonKind, ProcessesMixin, Steps
from .errors import LabError
from .host import ENV, MOUNT, PATH, SH, UNSHARE, listening, on_one_cpu, tail, tool, write_file
from .instances import HEAD
from .munge import MungeMixin

log = logging.getLogger("lab")

SLURMCTLD = tool("slurmctld")
SLURMD = tool("slurmd")
SINFO = tool("sinfo")
#: Where the node sees the lab's Slurm config (and pam_slurm_adopt looks for it).
SLURM_ETC = Path("/etc/slurm")
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
#: How long ``up`` waits for slurmctld to listen and then for every node to be idle.
SLURM_TIMEOUT = 30.0


class SlurmMixin(MungeMixin, ProcessesMixin):
    """The lab's Slurm: its config files, its daemons, and what ``status`` says of them.

    ``slurm_job_container``: set before ``up`` to give every job a private /tmp and
    /dev/shm (job_container/tmpfs, a mount namespace per job).

    With it, each node's mount namespace is made, and its slurmd runs, on one CPU. The
    plugin's stepd makes the job's namespace in a child and bind-mounts the child's
    /proc/PID/ns/mnt; the kernel refuses that bind (EINVAL, "ns base mount failed") when
    the new namespace's id is not above the stepd's own (its mount-namespace loop check),
    and this machine's kernel (6.18) hands out those ids from per-CPU batches, so a
    namespace made later on another CPU can have a lower id: the job then failed to start
    now and then, depending on the CPUs involved (reproduced outside Slurm, two processes
    pinned to CPUs 0 and 1). On one CPU the ids only grow."""

    slurm_job_container = False

    @property
    def slurm_dir(self) -> Path:
        """``DIR/slurm``: config (``etc/``), state, spool dirs and pid files of Slurm."""
        return self.dir / "slurm"

    def slurm_spool_dir(self, node: str) -> Path:
        """The node's SlurmdSpoolDir (where its slurmstepd sockets are)."""
        return self.slurm_dir / "spool" / node

    def slurm_config(self) -> str:
        """slurm.conf (seen as /etc/slurm/slurm.conf in the nodes)."""
        d = self.slurm_dir
        logs = self.dir / "logs"
        # config_overrides: the node lines below are authoritative (every slurmd sees the
        # whole machine; a RealMemory or CPU count above the hardware's would drain it).
        cpus = max(1, min(2, os.cpu_count() or 1))
        lines = [
            "# written by deploy/lab/lab.py (lab.py up --slurm): Slurm 22.05, bookworm",
            f"ClusterName={self.name}",
            f"SlurmctldHost={HEAD}({self.ip(HEAD)})",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={SLURMCTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # The host path: slurmctld's namespace has no /run/munge bind; nodes reach it too.
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={logs / 'slurmctld.log'}",
            f"SlurmdLogFile={logs}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={SLURM_ETC / 'plugstack.conf'}",
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/none",
            "PrologFlags=contain",
            # Accounting of running steps, read with sstat (it asks the stepd: no slurmdbd).
            # linux, not cgroup: jobacct_gather/cgroup reads the cpuacct and memory
            # controllers, and the lab never uses memory. task=1: samples every second.
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=task=1",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=30",
        ]
        if self.slurm_job_container:
            lines.append("JobContainerType=job_container/tmpfs")
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeAddr={self.ip(node)} CPUs={cpus} "
                         "RealMemory=1000 State=UNKNOWN")
        # OverSubscribe=FORCE:4: up to four jobs share a core, so that tests and benchmarks
        # can hold several sleeping jobs per node on a 2-core machine.
        lines += ["PartitionName=lab Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
                  "OverSubscribe=FORCE:4", ""]
        return "\n".join(lines)

    @staticmethod
    def cgroup_config() -> str:
        """cgroup.conf: cgroup/v1, nothing constrained, so only the freezer is used."""
        return "\n".join([
            "# written by deploy/lab/lab.py: v1 freezer only (proctrack), never memory",
            "CgroupPlugin=cgroup/v1",
            "CgroupAutomount=no",
            "CgroupMountpoint=/sys/fs/cgroup",
            "ConstrainCores=no",
            "ConstrainDevices=no",
            "ConstrainRAMSpace=no",
            "ConstrainSwapSpace=no",
            "",
        ])

    def _make_slurm_dirs(self) -> None:
        d = self.slurm_dir
        for sub in ("etc", "state", "run", "spool"):
            (d / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        for node in self.nodes:
            self.slurm_spool_dir(node).mkdir(mode=0o755, exist_ok=True)
        write_file(d / "etc" / "slurm.conf", self.slurm_config())
        write_file(d / "etc" / "cgroup.conf", self.cgroup_config())
        write_file(d / "etc" / "plugstack.conf", "# no SPANK plugins in the lab\n")
        if self.slurm_job_container:
            write_file(d / "etc" / "job_container.conf", self.job_container_config())

    def job_container_config(self) -> str:
        """job_container.conf: a BasePath of each node's own (they share the host's disk)."""
        return "\n".join(["# written by deploy/lab/lab.py: job_container/tmpfs",
                          *(f"NodeName={node} AutoBasePath=true "
                            f"BasePath={self.slurm_dir / 'jc' / node}" for node in self.nodes),
                          ""])

    # ------------------------------------------------------------ running

    def _slurmctld_pidfile(self) -> Path:
        return self.dir / "pids" / "slurmctld.pid"

    def _slurmd_pidfile(self, node: str) -> Path:
        return self.dir / "pids" / f"slurmd-{node}.pid"

    def _spawn_slurmctld(self) -> subprocess.Popen[bytes]:
        """slurmctld -D in the head network namespace, in a UTS and mount namespace of its
        own: hostname ``head`` (it must match SlurmctldHost), the lab's hosts file over
        /etc/hosts (node names never reach DNS) and the lab's config over /etc/slurm."""
        script = [
            "set -e",
            f"echo {HEAD} >/proc/sys/kernel/hostname",
            f"{MOUNT} --bind {shlex.quote(str(self.dir / 'hosts'))} /etc/hosts",
            f"{MOUNT} --bind {shlex.quote(str(self.slurm_dir / 'etc'))} {SLURM_ETC}",
            *self._detach_ns_lines(),
            'exec "$@"',
        ]
        argv = self._enter(HEAD, [f"--net={self.netns_path(HEAD)}"], [
            UNSHARE, "--uts", "--mount", "--propagation", "private", "--",
            SH, "-c", "\n".join(script), "lab-slurmctld",
            ENV, "-i", f"PATH={PATH}", SLURMCTLD, "-D",
            "-f", str(SLURM_ETC / "slurm.conf"),
        ])
        return self._spawn(argv, self.dir / "logs" / "slurmctld.out", self._slurmctld_pidfile())

    def _spawn_slurmd(self, node: str) -> subprocess.Popen[bytes]:
        """slurmd -D -N <node> inside the node (its net, UTS, mount and cgroup namespaces).

        With ``slurm_job_container``, the node's BasePath is first made a private mount of
        its own in the node's mount namespace: job_container/tmpfs bind-mounts each job's
        namespace file there, which the kernel refuses (EINVAL) under a shared mount, and
        the node's /run is shared whenever the host's is."""
        daemon = [ENV, "-i", f"PATH={PATH}", SLURMD, "-D", "-N", node,
                  "-f", str(SLURM_ETC / "slurm.conf")]
        if self.slurm_job_container:
            base = shlex.quote(str(self.slurm_dir / "jc" / node))
            daemon = [*on_one_cpu(), SH, "-c", "\n".join([
                "set -e", f"mkdir -p {base}", f"{MOUNT} --bind {base} {base}",
                f"{MOUNT} --make-private {base}", 'exec "$@"']), "lab-slurmd", *daemon]
        argv = self._enter(node, self._node_ns_args(node), daemon)
        return self._spawn(argv, self.dir / "logs" / f"slurmd-{node}.out",
                           self._slurmd_pidfile(node))

    def _wait_listening(self, p: subprocess.Popen[bytes], what: str, ip: str, port: int,
                        logf: Path, deadline: float) -> None:
        """Wait until p listens on ip:port or on the IPv4 wildcard (Slurm binds that)."""
        while not (listening(p.pid, [(ip, port)]) or listening(p.pid, [("0.0.0.0", port)])):
            if p.poll() is not None:
                raise LabError(f"{what} exited with rc={p.returncode}; tail of {logf}:\n"
                               f"{tail(logf)}\n{tail(logf.with_suffix('.out'))}")
            if time.monotonic() > deadline:
                raise LabError(f"{what} does not listen on port {port} after "
                               f"{SLURM_TIMEOUT:.0f} s; tail of {logf}:\n{tail(logf)}")
            time.sleep(0.01)

    def _start_slurm(self) -> dict[str, subprocess.Popen[bytes]]:
        """slurmctld, and once it listens, every slurmd (they register at start)."""
        deadline = time.monotonic() + SLURM_TIMEOUT
        ctld = self._spawn_slurmctld()
        self._wait_listening(ctld, "slurmctld", self.ip(HEAD), SLURMCTLD_PORT,
                             self.dir / "logs" / "slurmctld.log", deadline)
        procs = {HEAD: ctld}
        for node in self.nodes:
            procs[node] = self._spawn_slurmd(node)
        return procs

    def _wait_slurm(self, procs: Mapping[str, subprocess.Popen[bytes]]) -> None:
        """Wait until every node is ``idle`` in sinfo (slurmd registered, jobs can run)."""
        deadline = time.monotonic() + SLURM_TIMEOUT
        for node in self.nodes:
            self._wait_listening(procs[node], f"slurmd {node}", self.ip(node), SLURMD_PORT,
                                 self.dir / "logs" / f"slurmd-{node}.log", deadline)
        states: dict[str, str] = {}
        while True:
            r = self.run(self.nodes[0], [SINFO, "-h", "-N", "-o", "%N %T"], check=False,
                         timeout=SLURM_TIMEOUT)
            states = dict(line.split(None, 1) for line in r.stdout.splitlines()
                          if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            for name, p in procs.items():
                if p.poll() is not None:
                    what = "slurmctld" if name == HEAD else f"slurmd-{name}"
                    logf = self.dir / "logs" / f"{what}.log"
                    raise LabError(f"{what} exited with rc={p.returncode}; tail of {logf}:\n"
                                   f"{tail(logf)}")
            if time.monotonic() > deadline:
                raise LabError(f"Slurm nodes not idle after {SLURM_TIMEOUT:.0f} s: {states} "
                               f"(sinfo rc={r.returncode} {r.stderr.strip()}); tail of "
                               f"slurmctld.log:\n{tail(self.dir / 'logs' / 'slurmctld.log')}")
            time.sleep(0.05)

    def slurm_pid(self, node: str = HEAD) -> int | None:
        """The pid of slurmctld (``head``) or of a node's slurmd, if it runs in the lab."""
        pf = self._slurmctld_pidfile() if node == HEAD else self._slurmd_pidfile(node)
        return self._live_pid(pf)

    def slurm_log(self, node: str = HEAD) -> str:
        """slurmctld's log (``head``) or a node's slurmd log."""
        name = "slurmctld.log" if node == HEAD else f"slurmd-{node}.log"
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / "logs" / name).read_text(errors="replace")
        return ""

    def slurm_stepd_pids(self) -> list[int]:
        """The slurmstepd processes of this lab (found in its cgroups by their name)."""
        out = []
        for pid in sorted(self._lab_pids()):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd":
                    out.append(pid)
        return out


class Slurm(DaemonKind[SlurmMixin]):
    """slurmctld and one slurmd per node: in labs up with ``slurm=True`` only.

    ``start`` starts slurmctld, waits until it listens, then starts every slurmd;
    ``wait`` waits until every node is idle. ``stop`` stops the slurmd first, then
    slurmctld; the slurmstepd and the jobs' processes are killed with the rest of the
    lab's cgroups (and Slurm's cgroups, inside the lab's subtree, removed with them).
    """

    name = "slurm"

    def __init__(self, lab: SlurmMixin) -> None:
        super().__init__(lab)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def present(self, state: Mapping[str, Any]) -> bool:
        return bool(state.get("slurm", False))

    def tools(self) -> list[str]:
        return [SLURMCTLD, SLURMD, SINFO]

    def host_dirs(self) -> list[Path]:
        return [SLURM_ETC]

    def mounts(self, node: str) -> list[tuple[Path, Path]]:
        return [(self.lab.slurm_dir / "etc", SLURM_ETC)]

    def make_dirs(self) -> None:
        self.lab._make_slurm_dirs()

    def start(self) -> None:
        self._procs = self.lab._start_slurm()

    def wait(self) -> None:
        self.lab._wait_slurm(self._procs)

    def pidfiles(self) -> list[Path]:
        return [*(self.lab._slurmd_pidfile(n) for n in self.lab.nodes),
                self.lab._slurmctld_pidfile()]

    def stop(self, step: Steps) -> None:
        """Every slurmd at once, then slurmctld (SIGTERM, waited for, then SIGKILL)."""
        for pf in self.pidfiles()[:-1]:
            step(f"stop {pf.name}", self.lab._stop_pidfile, pf, signal.SIGTERM, False)
        super().stop(step)

    def status(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if not self.present(state):
            return {}
        pid = self.lab.slurm_pid(HEAD)
        return {"slurm": {"slurmctld_pid": pid, "slurmctld_alive": pid is not None,
                          "slurmstepd_pids": self.lab.slurm_stepd_pids(),
                          "conf": str(self.lab.slurm_dir / "etc" / "slurm.conf")}}

    def node_status(self, node: str, state: Mapping[str, Any]) -> dict[str, Any]:
        if not self.present(state):
            return {}
        return {"slurmd_pid": self.lab.slurm_pid(node),
                "slurm_spool": str(self.lab.slurm_spool_dir(node))}
