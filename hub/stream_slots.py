"""Fair admission for the envelope route's streams: a board-wide cap, a cap per source address, first come first
served, and a minimum read pace, so that no one who can open connections holds every slot.

A big envelope (hub/envelope_routes.py) is streamed to each lessee within ``max_envelope_streams`` slots. A
slot held by a reader that never reads was held for ``body_timeout_s``: 32 slow lessees (one volunteer with 32
agent keys from one address) held them all, an honest lessee's fetch waited past its 120 s limit and its task was
handed back. Two bounds turn that into a cost of a few slots for a while:

- **per address**: at most ``max_envelope_streams_per_address`` streams (and waiters for a board-wide slot) from
  one source address; more from it wait in line behind its own, not the board's. Keys are free (open
  registration), addresses are not. A lab behind one NAT shares its own cap: its machines fetch a few at a time,
  which on a shared uplink is no slower than all at once (off on a hub bound to loopback, where every caller is
  one address, as ``max_connections_per_address`` is);
- **a read pace**: once ``envelope_read_grace_s`` have passed, a stream must have taken its bytes at
  ``min_envelope_read_bytes_per_s`` on average, else it is closed (its reader may ask again, at the back of the
  line). Waiters are served in the order they came (asyncio's semaphores are FIFO), so a closed slow stream's
  slot goes to whoever waited longest, not to its reader asking again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hub.config import LOOPBACK_BINDS, HubConfig

__all__ = ["ReadPace", "StreamSlots"]


@dataclass
class _Address:
    semaphore: asyncio.Semaphore
    users: int = 0          # holders and waiters: the entry goes when none is left


class StreamSlots:
    """At most ``total`` streams at once and at most ``per_address`` from one source address (0: no cap there).
    Memory is one entry per address with a stream open or waiting (each is a connection: ``max_connections``)."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = max(1, total)
        self.per_address = max(0, per_address)
        self._slots = asyncio.Semaphore(self.total)
        self._addresses: dict[str, _Address] = {}

    @classmethod
    def from_config(cls, config: HubConfig) -> StreamSlots:
        per_address = 0 if config.bind in LOOPBACK_BINDS else config.max_envelope_streams_per_address
        return cls(config.max_envelope_streams, per_address)

    def open_from(self, address: str) -> int:
        """Streams open or waiting from ``address`` (what its cap counts)."""
        entry = self._addresses.get(address)
        return entry.users if entry is not None else 0

    @contextlib.asynccontextmanager
    async def slot(self, address: str) -> AsyncIterator[None]:
        """Hold a board-wide slot, taken after one of ``address``'s own (waiting costs a request, not a body)."""
        if not self.per_address:
            async with self._slots:
                yield
            return
        entry = self._addresses.get(address)
        if entry is None:
            entry = self._addresses[address] = _Address(asyncio.Semaphore(self.per_address))
        entry.users += 1
        try:
            async with entry.semaphore, self._slots:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._addresses[address]


@dataclass(frozen=True)
class ReadPace:
    """When each byte of a stream must have been taken: never later than ``limit_s`` after the start, and after
    ``grace_s`` at ``min_bytes_per_s`` on average (0: no pace, the limit alone)."""

    limit_s: float
    grace_s: float
    min_bytes_per_s: float

    @classmethod
    def from_config(cls, config: HubConfig) -> ReadPace:
        return cls(config.body_timeout_s, config.envelope_read_grace_s, config.min_envelope_read_bytes_per_s)

    def due_s(self, sent: int) -> float:
        """Seconds after the start by which the first ``sent`` bytes must have been taken."""
        if self.min_bytes_per_s <= 0:
            return self.limit_s
        return min(self.limit_s, max(self.grace_s, sent / self.min_bytes_per_s))
