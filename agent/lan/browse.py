"""Browsing ``_panal._tcp.local.``: resolve peers' announcements into a :class:`PeerTable`.

The service browser reports new and removed services; every received record (refreshes included)
is also watched, since a re-announcement is a peer's sign of life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from zeroconf import RecordUpdate, RecordUpdateListener, ServiceStateChange, Zeroconf
from zeroconf._dns import DNSPointer, DNSRecord  # not re-exported; stable since 0.3x
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent.lan.announce import SERVICE_TYPE, Announcement
from agent.lan.peers import Peer, PeerCallback, PeerEvent, PeerTable
from security.errors import BadRequest

__all__ = ["LanBrowser"]

log = logging.getLogger(__name__)
_RESOLVE_TIMEOUT_MS = 3000


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
