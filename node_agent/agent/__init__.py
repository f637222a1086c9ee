"""The node agent daemon (`node-agent`, root, one per node).

  server     builds and runs the gRPC server, the admission socket and the rest
  service    the NodeAgent servicer: caller ID, jobs, ssh-to-job streams
  admission  decides ssh logins for pam_adopt (root-only Unix socket)
  sessions   ssh-to-job's agent side: a private `sshd -i` inside a job
  limits     caps on ssh-to-job sessions
  warmup     keeps the kernel's cgroup migration lock switched while logins arrive
  metrics    Prometheus metrics

Jobs come from a backend (node_agent.jobs); nothing here knows how a backend keeps them.
"""
