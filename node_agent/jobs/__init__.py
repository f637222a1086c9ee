"""Job backends: where the agent's jobs come from.

  base    the JobBackend protocol (what the daemon needs from a scheduler), JobRecord,
          JobCgroup, and JobControl for backends that start and end jobs themselves
  native  the native registry (SQLite + the cgroups the agent makes), fed by `adoptctl`
          from any scheduler's prolog/epilog: the default
  slurm   Slurm's own jobs, through their slurmstepd sockets (`backend = "slurm"`), over
    stepd      the slurmstepd socket protocol client (22.05 to 26.11)
    slurmconf  Slurm's facts on a node: slurm.conf, cgroup.conf, the stepd sockets,
               cgroup path -> job

`open_backend` makes the configured one. Nothing here imports the daemon or the CLIs.
"""

from __future__ import annotations

from node_agent.config import AgentConfig
from node_agent.jobs.base import JobBackend, JobCgroup, JobControl, JobRecord

__all__ = ["JobBackend", "JobCgroup", "JobControl", "JobRecord", "open_backend"]


def open_backend(config: AgentConfig) -> JobBackend:
    """The node's job backend (`backend` in agent.toml), ready (call its close() when
    done); StartupError when it cannot be set up."""
    if config.backend == "slurm":
        from node_agent.jobs import slurm

        return slurm.open_slurm(config)
    from node_agent.jobs import native

    return native.open_registry(config)
