"""callerid-adopt's node agent, its job backends and its command-line tools.

    node_agent/
      agent/      the daemon (`node-agent`, root, one per node): server, service,
                  admission, sessions (ssh-to-job), limits, warmup, metrics, jobindex
                  (the job's homes: where other nodes' jobs run)
      jobs/       job backends behind one protocol (base.JobBackend): native (the
                  registry, the default), slurm (+ stepd, slurmconf, slurmctl); the
                  daemon uses nothing else of them
      cli/        the tools: adoptctl, ssh_to_job (+ fdpass, its ProxyCommand; ssh_proxy,
                  `ssh job.42`), locate (finding a job's node, for every CLI), daemon
                  (the `node-agent` entry point), common (one error handler)
      config      agent.toml              auth      MUNGE credentials, both ways
      dial        reaching an agent       client    typed calls to an agent
      errors      the error catalog       jobenv    the variables a job's processes get
      jobhome     a job's homes among `nodes` (rendezvous hashing)
      jobids      job ids as users write them (CLUSTER.PROC) -> the backend's
      pamcontract the contract with pam_adopt (options, socket, messages, wire format)
      pbconv      callerid's types to and from the gRPC messages, in one place
      shellwire, relaybuf   the ssh-to-job stream on the wire and its buffers
      launch, spawn         the stdlib-only launcher that joins a job and drops to its
                            user, and the agent's side of it
      proto/      generated gRPC stubs

Directions (tests/unit/test_architecture.py keeps them): the `callerid` library imports
nothing of this package; `jobs/` imports neither `agent/` nor `cli/`; the shared modules
at the top import none of the three; the CLIs import the daemon only through the
`node-agent` entry point; only `dial` makes gRPC channels.
"""

__version__ = "0.2.0"
