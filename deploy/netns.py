"""Test hosts as Linux network namespaces, joined by a bridge, for multi-host runs on one machine.

Each host is a namespace with its own loopback and one veth leg on a shared
bridge in the root namespace (which also gets an address, so the test process
can reach every host). Addresses come from a private /24 used only by these
namespaces; nothing leaves the machine. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mesh.errors import MeshError

SUBNET = "10.213.{net}"  # /24 per group of hosts; .1 is the root namespace's bridge address


class NetnsUnavailable(MeshError):
    pass


@dataclass(frozen=True)
class Host:
    name: str  # namespace name
    ip: str

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix a command line with this to run it on the host."""
        return ["ip", "netns", "exec", self.name]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)
    if check and result.returncode != 0:
        raise NetnsUnavailable(
            f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}"
        )
    return result


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"tmprobe{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@contextmanager
def hosts(count: int, *, net: int | None = None) -> Iterator[list[Host]]:
    """Create `count` hosts on a fresh bridge; remove everything on exit, even after errors."""
    reason = available()
    if reason:
        raise NetnsUnavailable(reason)
    tag = os.getpid() % 100000
    net = net if net is not None else 100 + tag % 100
    subnet = SUBNET.format(net=net)
    bridge = f"tmbr{tag}"
    made: list[Host] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(1, count + 1):
            host = Host(f"tmh{tag}x{i}", f"{subnet}.{10 + i}")
            _ip("netns", "add", host.name)
            made.append(host)
            outer, inner = f"tmv{tag}x{i}", f"tmp{tag}x{i}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", host.name)
            ns = ["-n", host.name]
            _ip(*ns, "link", "set", "lo", "up")
            _ip(*ns, "addr", "add", f"{host.ip}/24", "dev", inner)
            _ip(*ns, "link", "set", inner, "up")
        yield made
    finally:
        for host in made:
            _ip("netns", "del", host.name, check=False)  # removes its veth pair too
        _ip("link", "del", bridge, check=False)


def isolate(host: Host) -> None:
    """Cut a host off the network, as a pulled cable or a dead machine would."""
    _ip("-n", host.name, "link", "set", "lo", "down", check=False)
    links = _ip("-n", host.name, "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            _ip("-n", host.name, "link", "set", name, "down", check=False)
