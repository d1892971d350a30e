"""Task slots shared by every board the daemon pulls from.

Each board's lease loop reserves its fair share of the free slots before it polls, so one idle
board's long poll cannot hold them all, and gives back what the board did not fill. While the
volunteer's rules pause the agent, no slot is handed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Slots"]


class Slots:
    """``total`` slots; ``is_open()`` says whether new work may start (False while paused)."""

    def __init__(self, total: int, is_open: Callable[[], bool]) -> None:
        self.total = total
        self.free = total
        self._is_open = is_open
        self._changed = asyncio.Condition()

    async def reserve(self, boards: int) -> int:
        """Wait for a free slot and an open gate; take one board's share (of ``boards``) of the free ones."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0 and self._is_open())
            share = max(1, self.free // max(1, boards))
            self.free -= share
            return share

    async def release(self, n: int) -> None:
        """Give back ``n`` slots (a task ended, or a board filled fewer than it reserved)."""
        if n <= 0:
            return
        async with self._changed:
            self.free += n
            self._changed.notify_all()

    async def wake(self) -> None:
        """Let waiting reservations look at the gate again (a pause ended)."""
        async with self._changed:
            self._changed.notify_all()
