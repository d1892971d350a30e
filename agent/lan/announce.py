"""What an agent announces over mDNS (``_panal._tcp.local.``), and the announcer that keeps it fresh.

The TXT record carries the agent's id, its board's port and certificate fingerprint, its device
classes, free slots and whether its board has queued work. Announcers re-send their records every
``refresh_s`` (below the peers' ``ttl_s``): a peer's table takes that as a sign of life.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import Zeroconf
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from agent.lan.interfaces import LocalAddress
from security.errors import BadRequest

__all__ = ["PROTOCOL_VERSION", "SERVICE_TYPE", "Announcement", "LanAnnouncer"]

SERVICE_TYPE = "_panal._tcp.local."
PROTOCOL_VERSION = "1"


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
