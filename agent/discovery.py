"""LAN discovery: agents announce ``_panal._tcp.local.`` over mDNS and keep a table of their peers.

mDNS alone cannot tell that a peer died: a SIGKILLed peer sends no goodbye and zeroconf keeps its
PTR record for many minutes. So :class:`PeerTable` adds its own liveness: a peer is dropped after
``max_failures`` consecutive failed contacts (:meth:`PeerTable.mark_failed`, from the daemon) or
``ttl_s`` seconds with neither a successful contact (:meth:`PeerTable.mark_alive`) nor a
re-announcement; announcers re-send their records every ``refresh_s`` (< ``ttl_s``) for that.
A dropped peer is kept as ``gone`` for a while and comes back when it re-announces or answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import ifaddr
from zeroconf import (
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf._dns import DNSPointer, DNSRecord  # not re-exported; stable since 0.3x
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from security.errors import BadRequest

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Announcement",
    "InterfacePolicy",
    "LanAnnouncer",
    "LanBrowser",
    "LocalAddress",
    "Peer",
    "PeerCallback",
    "PeerEvent",
    "PeerState",
    "PeerTable",
    "open_zeroconf",
    "select_addresses",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_panal._tcp.local."
PROTOCOL_VERSION = "1"
_RESOLVE_TIMEOUT_MS = 3000


# ---------------------------------------------------------------- interfaces


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


# ---------------------------------------------------------------- what an agent announces


@dataclass(frozen=True)
class Announcement:
    """The TXT record of an agent: short standard-style keys, all values strings on the wire."""

    agent_id: str
    port: int
    fingerprint: str
    caps: tuple[str, ...] = ()
    slots: int = 0
    work: bool = False
    version: str = PROTOCOL_VERSION

    @property
    def instance(self) -> str:
        return f"panal-{self.agent_id}.{SERVICE_TYPE}"

    def txt(self) -> dict[str, str]:
        return {
            "id": self.agent_id,
            "v": self.version,
            "port": str(self.port),
            "fp": self.fingerprint,
            "caps": ",".join(self.caps),
            "slots": str(self.slots),
            "work": "1" if self.work else "0",
        }

    @classmethod
    def from_txt(cls, txt: dict[str, str | None]) -> Announcement:
        """Parse a TXT record; raises :class:`BadRequest` naming the bad key."""

        def need(key: str) -> str:
            value = txt.get(key)
            if not value:
                raise BadRequest(f"TXT record lacks {key!r}")
            return value

        def number(key: str, default: str | None = None) -> int:
            raw = txt.get(key) or default
            if raw is None or not raw.isdigit():
                raise BadRequest(f"TXT key {key!r} is not a number: {raw!r}")
            return int(raw)

        caps = tuple(c for c in (txt.get("caps") or "").split(",") if c)
        return cls(need("id"), number("port"), need("fp"), caps, number("slots", "0"),
                   txt.get("work") == "1", need("v"))


# ---------------------------------------------------------------- the peer table


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # at least one failed contact since the last sign of life
    GONE = "gone"  # dropped: too many failures or silent past the TTL; hidden from peers()


class PeerEvent(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True)
class Peer:
    id: str
    addresses: tuple[str, ...]
    port: int
    fingerprint: str
    caps: tuple[str, ...]
    slots: int
    work: bool
    version: str
    last_seen: float  # wall clock (epoch seconds) of the last announcement or successful contact
    state: PeerState = PeerState.ALIVE
    failures: int = 0
    instance: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(addresses=list(self.addresses), caps=list(self.caps), state=str(self.state))
        return data


PeerCallback = Callable[[PeerEvent, Peer], Awaitable[None]]
Listener = Callable[[PeerEvent, Peer], None]


@dataclass
class PeerTable:
    """Discovered peers and their liveness. Not thread-safe: use from the event loop only."""

    ttl_s: float = 10.0
    max_failures: int = 3
    forget_s: float = 3600.0  # how long a gone peer is remembered so it can come back
    listener: Listener | None = None
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, Peer] = field(default_factory=dict, repr=False)
    _seen: dict[str, float] = field(default_factory=dict, repr=False)  # monotonic last sign of life

    def peers(self, *, include_gone: bool = False) -> list[Peer]:
        return sorted(
            (p for p in self._peers.values() if include_gone or p.state is not PeerState.GONE),
            key=lambda p: p.id,
        )

    def get(self, peer_id: str) -> Peer | None:
        return self._peers.get(peer_id)

    def to_json(self) -> str:
        return json.dumps([p.to_dict() for p in self.peers()], indent=2)

    def observe(self, ann: Announcement, addresses: Sequence[str], instance: str = "") -> Peer:
        """Record a resolved announcement: adds, updates or revives the peer."""
        old = self._peers.get(ann.agent_id)
        peer = Peer(ann.agent_id, tuple(addresses), ann.port, ann.fingerprint, ann.caps, ann.slots,
                    ann.work, ann.version, time.time(), PeerState.ALIVE, 0, instance)
        if old is None or old.state is PeerState.GONE:
            event: PeerEvent | None = PeerEvent.ADDED
        elif dataclasses.replace(old, last_seen=peer.last_seen) != peer:
            event = PeerEvent.UPDATED
        else:
            event = None
        self._set(peer, event)
        return peer

    def touch(self, peer_id: str) -> Peer | None:
        """A sign of life from mDNS (re-announcement or answer): same as a successful contact."""
        return self.mark_alive(peer_id)

    def mark_alive(self, peer_id: str) -> Peer | None:
        """A successful contact: clears failures; revives a gone peer. Unknown ids are ignored."""
        old = self._peers.get(peer_id)
        if old is None:
            return None
        peer = dataclasses.replace(old, last_seen=time.time(), state=PeerState.ALIVE, failures=0)
        event = {PeerState.GONE: PeerEvent.ADDED, PeerState.SUSPECT: PeerEvent.UPDATED}.get(old.state)
        self._set(peer, event)
        return peer

    def mark_failed(self, peer_id: str) -> Peer | None:
        """A failed contact; the ``max_failures``-th in a row drops the peer. Unknown ids are ignored."""
        old = self._peers.get(peer_id)
        if old is None or old.state is PeerState.GONE:
            return old
        failures = old.failures + 1
        state = PeerState.GONE if failures >= self.max_failures else PeerState.SUSPECT
        peer = dataclasses.replace(old, state=state, failures=failures)
        self._peers[peer_id] = peer
        self._emit(PeerEvent.REMOVED if state is PeerState.GONE else PeerEvent.UPDATED, peer)
        return peer

    def goodbye(self, peer_id: str) -> Peer | None:
        """The peer left cleanly: forget it at once."""
        old = self._peers.pop(peer_id, None)
        self._seen.pop(peer_id, None)
        if old is not None and old.state is not PeerState.GONE:
            self._emit(PeerEvent.REMOVED, dataclasses.replace(old, state=PeerState.GONE))
        return old

    def expire(self) -> list[Peer]:
        """Drop peers silent for ``ttl_s``; forget gone ones after ``forget_s``. Returns the dropped."""
        now, dropped = self.clock(), []
        for peer_id, seen in list(self._seen.items()):
            peer = self._peers[peer_id]
            if peer.state is not PeerState.GONE and now - seen > self.ttl_s:
                peer = dataclasses.replace(peer, state=PeerState.GONE)
                self._peers[peer_id] = peer
                dropped.append(peer)
                self._emit(PeerEvent.REMOVED, peer)
            elif peer.state is PeerState.GONE and now - seen > self.forget_s:
                del self._peers[peer_id], self._seen[peer_id]
        return dropped

    def _set(self, peer: Peer, event: PeerEvent | None) -> None:
        self._peers[peer.id] = peer
        self._seen[peer.id] = self.clock()
        if event is not None:
            self._emit(event, peer)

    def _emit(self, event: PeerEvent, peer: Peer) -> None:
        log.debug("peer %s %s (%s)", peer.id, event, peer.state)
        if self.listener is not None:
            self.listener(event, peer)


# ---------------------------------------------------------------- announcing


class LanAnnouncer:
    """Announces this agent on ``zc`` and keeps the announcement fresh; ``close`` says goodbye."""

    def __init__(
        self,
        zc: AsyncZeroconf,
        announcement: Announcement,
        addresses: Sequence[LocalAddress],
        *,
        refresh_s: float | None = 3.0,
    ) -> None:
        if not addresses:
            raise BadRequest("no allowed address to announce")
        self._zc = zc
        self._addresses = [a.ip for a in addresses]
        self.announcement = announcement
        self._info = self._make_info(announcement)
        self._refresh_s = refresh_s
        self._refresher: asyncio.Task[None] | None = None

    def _make_info(self, ann: Announcement) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE, ann.instance, port=ann.port, properties=ann.txt(),
            server=f"panal-{ann.agent_id}.local.", parsed_addresses=self._addresses,
        )

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    async def start(self) -> None:
        # The instance name embeds the agent id, so it is unique: skip conflict probing (~1 s).
        # register/unregister return a task that must itself be awaited, or closing cancels it.
        await (await self._zc.async_register_service(self._info, cooperating_responders=True))
        if self._refresh_s:
            self._refresher = asyncio.create_task(self._refresh_loop(self._refresh_s))

    async def update(self, *, slots: int | None = None, work: bool | None = None) -> None:
        """Change free slots / queued-work flag and re-announce (no-op when nothing changed)."""
        changes: dict[str, Any] = {}
        if slots is not None:
            changes["slots"] = slots
        if work is not None:
            changes["work"] = work
        ann = dataclasses.replace(self.announcement, **changes)
        if ann == self.announcement:
            return
        self.announcement, self._info = ann, self._make_info(ann)
        await (await self._zc.async_update_service(self._info))

    async def _refresh_loop(self, every_s: float) -> None:
        zc: Zeroconf = self._zc.zeroconf
        while True:
            await asyncio.sleep(every_s)
            zc.async_send(zc.generate_service_broadcast(self._info, None))  # one packet: a heartbeat

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await (await self._zc.async_unregister_service(self._info))


# ---------------------------------------------------------------- browsing


class _Heartbeats(RecordUpdateListener):
    """Sees every record received, refreshes included, which the service browser does not report.

    Only a fresh record is a sign of life. zeroconf also calls listeners with expired ones: goodbyes
    (TTL 0), and every record its periodic cache cleanup purges, such as a peer's previous TXT that
    a newer one marked to expire (RFC 6762 10.2). Those say nothing about the peer being alive now;
    counting them kept a killed peer up to one cleanup interval (10 s) longer, or brought it back.
    """

    def __init__(self, on_names: Callable[[set[str]], None]) -> None:
        self._on_names = on_names
        self._names: set[str] = set()

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record: DNSRecord = update.new
            if record.is_expired(now):
                continue  # a goodbye (the browser's business) or a purged record: no sign of life
            name = record.alias if isinstance(record, DNSPointer) else record.name
            if name.lower().endswith("." + SERVICE_TYPE):
                self._names.add(name.lower())

    def async_update_records_complete(self) -> None:
        if self._names:
            names, self._names = self._names, set()
            self._on_names(names)


class LanBrowser:
    """Browses ``_panal._tcp.local.`` on ``zc`` into a :class:`PeerTable`; ``on_change`` is awaited
    for every table change, in order, one at a time."""

    def __init__(
        self,
        zc: AsyncZeroconf,
        *,
        self_id: str | None = None,
        table: PeerTable | None = None,
        on_change: PeerCallback | None = None,
        sweep_s: float | None = None,
    ) -> None:
        self._zc = zc
        self._self_id = self_id
        self.table = table if table is not None else PeerTable()
        self.table.listener = self._enqueue
        self._on_change = on_change
        self._sweep_s = sweep_s if sweep_s is not None else min(1.0, self.table.ttl_s / 4)
        self._names: dict[str, str] = {}  # instance name (lower case) -> peer id
        self._resolving: set[str] = set()
        self._events: asyncio.Queue[tuple[PeerEvent, Peer]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._browser: AsyncServiceBrowser | None = None
        self._heartbeats = _Heartbeats(self._on_heartbeat)

    def peers(self) -> list[Peer]:
        return self.table.peers()

    def mark_failed(self, peer_id: str) -> Peer | None:
        return self.table.mark_failed(peer_id)

    def mark_alive(self, peer_id: str) -> Peer | None:
        return self.table.mark_alive(peer_id)

    async def start(self) -> None:
        self._spawn(self._dispatch())
        self._spawn(self._sweep())
        self._zc.zeroconf.async_add_listener(self._heartbeats, None)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_state])

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
            self._zc.zeroconf.async_remove_listener(self._heartbeats)
            self._browser = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _enqueue(self, event: PeerEvent, peer: Peer) -> None:
        self._events.put_nowait((event, peer))

    async def _dispatch(self) -> None:
        while True:
            event, peer = await self._events.get()
            if self._on_change is None:
                continue
            try:
                await self._on_change(event, peer)
            except Exception:
                log.exception("peer change callback failed for %s %s", event, peer.id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            self.table.expire()

    def _on_state(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            peer_id = self._names.pop(name.lower(), None)
            if peer_id is not None:
                self.table.goodbye(peer_id)
        else:
            self._resolve_soon(name)

    def _on_heartbeat(self, names: set[str]) -> None:
        names.discard(f"panal-{self._self_id}.{SERVICE_TYPE}".lower())  # our own announcer's echo
        for name in names:
            peer_id = self._names.get(name)
            if peer_id is not None and self.table.get(peer_id) is not None:
                self.table.touch(peer_id)
            else:
                self._resolve_soon(name)  # a peer we forgot (or never resolved) is announcing

    def _resolve_soon(self, name: str) -> None:
        if name.lower() not in self._resolving:
            self._resolving.add(name.lower())
            self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._zc.zeroconf, _RESOLVE_TIMEOUT_MS):
                log.debug("could not resolve %s", name)
                return
            ann = Announcement.from_txt(info.decoded_properties)
            if ann.agent_id == self._self_id:
                return
            if info.port is not None and info.port != ann.port:
                raise BadRequest(f"SRV port {info.port} differs from TXT port {ann.port}")
            self._names[name.lower()] = ann.agent_id
            self.table.observe(ann, info.parsed_scoped_addresses(), name)
        except BadRequest as exc:
            log.info("ignoring malformed panal announcement %s: %s", name, exc.message)
        finally:
            self._resolving.discard(name.lower())
