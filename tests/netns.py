"""A lab of network namespaces for multi-host tests (mDNS, HTTP between "machines").

Same topology as ``shared/netns-lab.sh``: hosts ``PREFIX-1..N`` each with ``lo`` and ``eth0`` =
``NET.i/24`` (multicast route, no default route, IPv6 off) on a bridge inside ``PREFIX-sw``
(snooping off). Nothing is created in the root namespace and no traffic can leave the lab.

Use the ``netns_lab`` fixture (one lab per xdist worker, torn down at session end) and, per test,
``lan_lab`` (the same lab; processes left inside its hosts are killed after the test). Needs root;
where the lab cannot be built the tests fail under CI and skip elsewhere, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from system_needs import require_system

__all__ = ["NetnsLab", "lab_unavailable", "lan_lab", "netns_lab"]

HOSTS = 4
_NAME = re.compile(r"^pnl-[a-z0-9]+-(\d+)-(sw|\d+)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def lab_unavailable() -> str | None:
    """Why no lab can be built here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"pnl-probe-{os.getpid()}-sw"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class NetnsLab:
    prefix: str
    hosts: int
    net: str = "10.203.0"

    def ns(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def addr(self, i: int) -> str:
        return f"{self.net}.{i}"

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host ``i``."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def sh(self, i: int, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(i, ["sh", "-c", script]), check=check, capture_output=True,
                              text=True, timeout=30)

    def pids(self, i: int) -> list[int]:
        out = _ip("netns", "pids", self.ns(i), check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """Kill every process inside the hosts (they would keep an unnamed namespace alive)."""
        for i in range(1, self.hosts + 1):
            for pid in self.pids(i):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)

    def up(self) -> None:
        self.down()
        sw = f"{self.prefix}-sw"
        _ip("netns", "add", sw)
        _sysctl(sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "stp_state", "0",
            "forward_delay", "0")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i in range(1, self.hosts + 1):
            h = self.ns(i)
            _ip("netns", "add", h)
            _sysctl(h)
            _ip("-n", sw, "link", "add", f"veth{i}", "type", "veth", "peer", "name", f"h{i}")
            _ip("-n", sw, "link", "set", f"h{i}", "netns", h)
            _ip("-n", h, "link", "set", f"h{i}", "name", "eth0")
            _ip("-n", sw, "link", "set", f"veth{i}", "master", "br0", "up")
            _ip("-n", h, "link", "set", "lo", "up")
            _ip("-n", h, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", h, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", h, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def down(self) -> None:
        self.kill_all()
        for name in _lab_namespaces():
            if name.startswith(self.prefix + "-"):
                _ip("netns", "del", name, check=False)


def _sysctl(ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True, timeout=30)


def _lab_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _reap_stale_labs() -> None:
    """Delete labs left by test processes that died without teardown (their pid is in the name)."""
    for name in _lab_namespaces():
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            _ip("netns", "del", name, check=False)


@pytest.fixture(scope="session")
def netns_lab(worker_id: str) -> Iterator[NetnsLab]:
    reason = lab_unavailable()
    require_system(None if reason is None else f"network namespace lab ({reason})")
    _reap_stale_labs()
    worker = re.sub(r"[^a-z0-9]", "", worker_id.lower()) or "main"
    lab = NetnsLab(prefix=f"pnl-{worker}-{os.getpid()}", hosts=HOSTS)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lan_lab(netns_lab: NetnsLab) -> Iterator[NetnsLab]:
    """The worker's lab for one test; processes the test left inside it are killed afterwards."""
    yield netns_lab
    netns_lab.kill_all()
