"""The lab's network: one network namespace per node plus a head namespace with a bridge,
veth pairs, IPv4 and IPv6 addresses, the hosts file the nodes see as /etc/hosts, and black
holes (nftables rules that drop incoming TCP to a port).

No lab namespace has a default route: nothing can leave the machine. See README.md,
"Layout".
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import LabError
from .host import IP, NFT, NSENTER, run_host
from .instances import HEAD, Instance

NETNS_DIR = Path("/run/netns")
BRIDGE = "cidbr0"
NET_TIMEOUT = 5.0
#: The node agent's port (also the port ``blackhole`` drops by default).
AGENT_PORT = 411
#: The agent's metrics endpoint, on loopback inside each node.
METRICS_PORT = 9817


class NetworkMixin(Instance):
    """Addresses, network namespaces, the bridge and the black holes of one lab."""

    def ip(self, node: str, family: int = 4) -> str:
        """``10.77.0.(10+i)`` or ``fd77::(10+i)`` for node i; ``head`` is .1 / ::1."""
        suffix = "1" if node == HEAD else str(10 + self.index(node))
        if family in (4, socket.AF_INET):
            return f"10.77.0.{suffix}"
        if family in (6, socket.AF_INET6):
            return f"fd77::{suffix}"
        raise ValueError(f"family must be 4 or 6, not {family}")

    def netns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def netns_path(self, node: str) -> Path:
        return NETNS_DIR / self.netns(node)

    def _hosts_text(self) -> str:
        """The hosts file bind-mounted over /etc/hosts in every node: lab names never
        reach DNS."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.ip(HEAD)} {HEAD}", f"{self.ip(HEAD, 6)} {HEAD}"]
        for node in self.nodes:
            lines += [f"{self.ip(node)} {node}", f"{self.ip(node, 6)} {node}"]
        return "# callerid-adopt lab\n" + "\n".join(lines) + "\n"

    def _make_network(self) -> None:
        for node in [HEAD, *self.nodes]:
            run_host([IP, "netns", "add", self.netns(node)])
        head = [
            "link set lo up",
            # STP off: ports forward at once; snooping off: NDP multicast is always flooded.
            f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
            f"addr add {self.ip(HEAD)}/24 dev {BRIDGE}",
            f"addr add {self.ip(HEAD, 6)}/64 dev {BRIDGE} nodad",
            f"link set {BRIDGE} up",
        ]
        for node in self.nodes:
            head += [
                f"link add veth-{node} type veth peer name eth0 netns {self.netns(node)}",
                f"link set veth-{node} master {BRIDGE}",
                f"link set veth-{node} up",
            ]
        run_host([IP, "-n", self.netns(HEAD), "-batch", "-"], input="\n".join(head) + "\n")
        for node in self.nodes:
            run_host([IP, "-n", self.netns(node), "-batch", "-"], input="\n".join([
                "link set lo up",
                f"addr add {self.ip(node)}/24 dev eth0",
                f"addr add {self.ip(node, 6)}/64 dev eth0 nodad",
                "link set eth0 up",
            ]) + "\n")
        self._wait_network()

    def _eth0_ready(self, node: str) -> bool:
        """The node's eth0 is up and none of its global IPv6 addresses is tentative."""
        link = json.loads(run_host(
            [IP, "-j", "-n", self.netns(node), "link", "show", "dev", "eth0"]).stdout)
        tent = json.loads(run_host(
            [IP, "-j", "-n", self.netns(node), "addr", "show", "dev", "eth0",
             "tentative"]).stdout)
        tentative = [a for i in tent for a in i.get("addr_info", [])
                     if a.get("family") == "inet6" and a.get("scope") == "global"]
        return link[0].get("operstate") == "UP" and not tentative

    def _wait_network(self) -> None:
        """Wait until every node's eth0 is up, no address is tentative, bridge ports forward."""
        deadline = time.monotonic() + NET_TIMEOUT
        pending = list(self.nodes)
        while True:
            still = [node for node in pending if not self._eth0_ready(node)]
            ports = json.loads(run_host(
                [IP, "-j", "-n", self.netns(HEAD), "link", "show", "master", BRIDGE]).stdout)
            if not still and all(p.get("operstate") == "UP" for p in ports):
                return
            if time.monotonic() > deadline:
                raise LabError(f"network not ready after {NET_TIMEOUT} s: {still or ports}")
            pending = still or pending
            time.sleep(0.02)

    # ------------------------------------------------- namespaces of a lab

    @staticmethod
    def _netns_names() -> list[str]:
        try:
            return sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []

    def _is_my_netns(self, name: str) -> bool:
        rest = name[len(self.name) + 1:] if name.startswith(self.name + "-") else ""
        return rest == HEAD or re.fullmatch(r"node[1-9][0-9]*", rest) is not None

    def _delete_netns(self) -> list[str]:
        """Delete this lab's network namespaces; returns what could not be deleted."""
        errors = []
        for name in self._netns_names():
            if self._is_my_netns(name):
                r = run_host([IP, "netns", "delete", name], check=False)
                if r.returncode != 0:
                    errors.append(f"ip netns delete {name}: {r.stderr.strip()}")
        return errors

    # ------------------------------------------------------- black holes

    def blackhole(self, node: str, port: int = AGENT_PORT, on: bool = True) -> None:
        """Drop incoming TCP to ``port`` in the node's netns (no RST), or stop dropping.

        nftables table ``inet <name>`` in the node's network namespace, one rule for all
        black-holed ports; the table goes when the last port is released (and at down).
        """
        self._require_root()
        self.index(node)
        if not os.path.isabs(NFT):
            raise LabError("nft not found: run deploy/install-deps.sh (package nftables)")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        state = self._require_state()
        holes: dict[str, list[int]] = state.setdefault("blackholes", {})
        ports = set(holes.get(node, []))
        if on:
            ports.add(port)
        else:
            ports.discard(port)
        self._apply_blackholes(node, sorted(ports))
        if ports:
            holes[node] = sorted(ports)
        else:
            holes.pop(node, None)
        self._save_state(state)

    def _apply_blackholes(self, node: str, ports: Sequence[int]) -> None:
        table = f"inet {self.name}"
        rules = [f"table {table}", f"delete table {table}"]  # atomic replace, ok if absent
        if ports:
            rules += [
                f"table {table} {{",
                "    chain input {",
                "        type filter hook input priority filter; policy accept;",
                f"        tcp dport {{ {', '.join(map(str, ports))} }} drop",
                "    }",
                "}",
            ]
        run_host([NSENTER, f"--net={self.netns_path(node)}", "--", NFT, "-f", "-"],
                 input="\n".join(rules) + "\n")

    def blackholes(self) -> dict[str, list[int]]:
        return dict(self._load_state().get("blackholes", {}))
