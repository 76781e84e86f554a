"""A private network for a multi-node test cluster on one machine (root only).

One Linux bridge in the machine's namespace holds the controller's address; every node is a
network namespace joined to it by a veth pair, with its own address on the bridge's /24 and
nothing else (no default route, so a node can reach only the bridge's subnet). The subnet is a
10.x.y.0/24 that no interface or route of the machine uses. Names carry this process's id, so
two clusters (or a stale one from a killed test) never collide; :meth:`destroy` removes only
what :meth:`create` made.
"""
from __future__ import annotations

import ipaddress
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NODE_INIT = Path(__file__).with_name("node_init.py")


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


@dataclass(frozen=True)
class Node:
    name: str  # the Slurm node name and the namespace's hostname
    addr: str
    netns: str


class Network:
    def __init__(self, node_names: list[str], controller_name: str):
        tag = os.getpid() % 100000
        self.bridge = f"elipbr{tag}"
        self.subnet = self._unused_subnet()
        self.controller_name = controller_name
        self.controller_addr = f"{self.subnet}.1"
        self.nodes = [Node(name, f"{self.subnet}.{11 + i}", f"elip{tag}-{name}") for i, name in enumerate(node_names)]
        self._veths = [f"elipv{tag}n{i}" for i in range(len(node_names))]
        self._made: list[tuple[str, str]] = []  # ("link" | "netns", name), in creation order

    @staticmethod
    def _unused_subnet() -> str:
        """A 10.x.y (/24) overlapping no address or route of the machine (any table)."""
        text = _ip("-4", "-o", "addr") + _ip("-4", "route", "show", "table", "all")
        used = [ipaddress.ip_network(m, strict=False)
                for m in re.findall(r"(?<![\d.])(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", text)]
        for _ in range(100):
            subnet = f"10.{random.randint(100, 254)}.{random.randint(0, 254)}"
            if not any(ipaddress.ip_network(f"{subnet}.0/24").overlaps(net) for net in used):
                return subnet
        raise RuntimeError("no unused 10.x.y.0/24 subnet found for the test cluster")

    def create(self) -> "Network":
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node, veth in zip(self.nodes, self._veths):
            _ip("netns", "add", node.netns)
            self._made.append(("netns", node.netns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
        return self

    def hosts_file(self, node: Node) -> str:
        """``node``'s /etc/hosts: the controller and every other node at its address, and the
        node's own name on 127.0.1.1, as Debian writes it for a machine's own hostname (so a
        program that binds "the address of my hostname" gets loopback, as on such clusters)."""
        lines = ["127.0.0.1 localhost", f"127.0.1.1 {node.name}", f"{self.controller_addr} {self.controller_name}"]
        lines += [f"{n.addr} {n.name}" for n in self.nodes if n != node]
        return "\n".join(lines) + "\n"

    def command(self, node: Node, hosts: Path, cmd: list[str]) -> list[str]:
        """``cmd`` run as ``node``: its network, hostname and hosts file (see node_init.py).
        Every step execs the next, so the returned command's process is ``cmd``'s.

        nsenter, not ``ip netns exec``: that one mounts a new /sys for the namespace, which hides
        /sys/fs/cgroup, and slurmd 22.05 then stops ("No filesystem mounted on /sys/fs/cgroup",
        "Unable to initialize cgroup plugin") even with proctrack/linuxproc and task/none."""
        return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount", "--",
                sys.executable, str(NODE_INIT), node.name, str(hosts), *cmd]

    def pids(self, node: Node) -> list[int]:
        """Every process in the node's network namespace (slurmd, its job steps, the ranks)."""
        return [int(p) for p in _ip("netns", "pids", node.netns).split()]

    def kill_all(self, node: Node) -> list[int]:
        """SIGKILL everything on the node (a node that loses power); returns the pids killed."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def destroy(self) -> None:
        """Kill what still runs in the namespaces, then delete them and the bridge (veths go with them)."""
        for node in self.nodes:
            if ("netns", node.netns) in self._made:
                try:
                    self.kill_all(node)
                except RuntimeError:
                    pass
        for kind, name in reversed(self._made):
            cmd = ["netns", "del", name] if kind == "netns" else ["link", "del", name]
            subprocess.run(["ip", *cmd], capture_output=True, timeout=30)
        self._made.clear()
