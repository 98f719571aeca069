"""Test hosts as Linux network namespaces on one bridge (root only; tests skip elsewhere).

``NetnsHosts(n)`` makes a bridge with address ``10.231.X.1/24`` in this (root) namespace and ``n``
namespaces with ``10.231.X.2``, ``.3``, ... each on a veth pair to the bridge. Traffic stays on this
machine: only these addresses and loopback are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"drprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add failed: {exc.stderr.strip()}"
    return None


def _free_subnet(first: int) -> int:
    """A ``10.231.X.0/24`` no interface here uses, trying ``first`` first (two test processes at once)."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    for n in [first, *range(250)]:
        if f"10.231.{n}." not in used:
            return n
    raise RuntimeError("no free 10.231.X.0/24 subnet")


class NetnsHosts:
    """A bridge here and ``count`` hosts (namespaces) on it; a context manager that removes them all."""

    def __init__(self, count: int) -> None:
        tag = os.getpid() % 100000
        self.subnet = f"10.231.{_free_subnet(os.getpid() % 250)}"
        self.bridge = f"drb{tag}"
        self.gateway = f"{self.subnet}.1"
        self.names = [f"drh{tag}-{i}" for i in range(count)]
        self.addresses = [f"{self.subnet}.{i + 2}" for i in range(count)]
        self._links = [f"drv{tag}h{i}" for i in range(count)]

    def __enter__(self) -> NetnsHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name, address, link in zip(self.names, self.addresses, self._links):
                _ip("netns", "add", name)
                _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
                _ip("link", "set", f"{link}p", "netns", name)
                _ip("link", "set", link, "master", self.bridge)
                _ip("link", "set", link, "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", f"{link}p")
                _ip("-n", name, "link", "set", f"{link}p", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def command(self, host: int, *argv: str) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.names[host], *argv]

    def cut(self, host: int) -> None:
        """Take the host's link down: its packets are dropped, connections hang (like a cable pull)."""
        _ip("link", "set", self._links[host], "down")

    def restore(self, host: int) -> None:
        """Bring the host's link back up after :meth:`cut` (the cable is plugged in again)."""
        _ip("link", "set", self._links[host], "up")

    def __exit__(self, *exc: object) -> None:
        for name, link in zip(self.names, self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
