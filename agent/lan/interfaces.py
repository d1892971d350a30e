"""Which of this host's addresses LAN mode may use, and a zeroconf instance bound to exactly those.

mDNS is never multicast out of every interface: the volunteer allows interfaces or networks
(``lan.interfaces``), globally routable addresses only when asked (``lan.allow_public``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncZeroconf

from security.errors import BadRequest

__all__ = ["InterfacePolicy", "LocalAddress", "open_zeroconf", "select_addresses"]


@dataclass(frozen=True)
class LocalAddress:
    """One address of this host that may be announced; ``scope_id`` is the interface index (IPv6)."""

    interface: str
    ip: str
    scope_id: int = 0

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version


@dataclass(frozen=True)
class InterfacePolicy:
    """Which local addresses the volunteer allows mDNS on.

    ``allow`` holds interface names (``eth0``) and/or networks (``192.168.1.0/24``); empty means every
    interface. Public (globally routable) addresses are never used unless ``allow_public`` is set,
    loopback only when named in ``allow``.
    """

    allow: tuple[str, ...] = ()
    allow_public: bool = False
    ipv6: bool = True

    def permits(self, interface: str, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if addr.is_multicast or addr.is_unspecified:
            return False
        if addr.is_global and not self.allow_public:
            return False
        if addr.version == 6 and not self.ipv6:
            return False
        named = interface in self.allow or any(
            "/" in entry and addr in ipaddress.ip_network(entry, strict=False) for entry in self.allow
        )
        if addr.is_loopback:
            return named
        return named or not self.allow


def select_addresses(
    policy: InterfacePolicy, adapters: Iterable[ifaddr.Adapter] | None = None
) -> list[LocalAddress]:
    """The local addresses ``policy`` permits (IPv4 first), from ``adapters`` or the live host."""
    chosen: list[LocalAddress] = []
    for adapter in ifaddr.get_adapters() if adapters is None else adapters:
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):
                text, scope = ip.ip[0].split("%")[0], ip.ip[2]
            else:
                text, scope = ip.ip, 0
            if policy.permits(adapter.nice_name, text):
                chosen.append(LocalAddress(adapter.nice_name, text, scope))
    chosen.sort(key=lambda a: a.version)
    return chosen


def open_zeroconf(addresses: Sequence[LocalAddress]) -> AsyncZeroconf:
    """A zeroconf instance bound to exactly ``addresses`` (never multicast out of every interface)."""
    if not addresses:
        raise BadRequest("no network interface is allowed for LAN discovery (check lan.interfaces)")
    # one IPv4 address per interface: a second multicast membership on the same link fails
    v4 = list({a.interface: a.ip for a in reversed(addresses) if a.version == 4}.values())
    v6 = sorted({a.scope_id for a in addresses if a.version == 6})
    version = IPVersion.All if v4 and v6 else IPVersion.V4Only if v4 else IPVersion.V6Only
    return AsyncZeroconf(interfaces=[*v4, *v6], ip_version=version)
