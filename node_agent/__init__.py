"""callerid-adopt's node agent, its client and its command-line tools.

The daemon (`node-agent`, root, one per node):
  server      builds and runs the gRPC server, the admission socket and the rest
  service     the NodeAgent servicer: caller ID, jobs, ssh-to-job streams
  admission   decides ssh logins for pam_adopt (root-only Unix socket)
  registry    the native job registry (SQLite + the cgroups the agent makes)
  jobshell    ssh-to-job's agent side: a private `sshd -i` inside a job
  launch      the stdlib-only launcher that joins a job's cgroups, drops to its user, execs
  spawn       the agent's side of the launcher
  limits      caps on ssh-to-job sessions
  warmup      keeps the kernel's cgroup migration lock switched while logins arrive
  metrics     Prometheus metrics
The command-line tools:
  cli         `node-agent` and `adoptctl`, and the error handler they share
  ssh_to_job  `ssh-to-job`; fdpass is its ssh ProxyCommand
Shared by both:
  auth        MUNGE credentials, both ways; client  calls to an agent; config  agent.toml;
  errors      the error catalog; jobenv  the variables a job's processes get;
  pamcontract the contract with pam_adopt: options, defaults, socket, wire format;
  pbconv      callerid's types to and from the gRPC messages (one place);
  shellwire, relaybuf  the ssh-to-job stream on the wire
"""

__version__ = "0.2.0"
