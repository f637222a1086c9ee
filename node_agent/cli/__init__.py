"""The command-line tools: thin `main(argv)` functions over the shared modules.

  adoptctl    `adoptctl` (jobs, caller ID) and `node-agent` (the daemon's entry point)
  ssh_to_job  `ssh-to-job`; fdpass is its ssh ProxyCommand

Only `node-agent`'s entry point imports the daemon (node_agent.agent), and only when run.
"""
