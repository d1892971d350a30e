"""Background duties of a board or an agent: periodic tasks and bounded drains.

A periodic duty (blob GC, the LAN trust sync) must outlive one bad round, so a failing call is
logged and the next one runs on schedule; it stops at once when its task is cancelled. A drain
gives in-flight work a bounded time to finish on shutdown; what is still running afterwards is
left to its owner (a board requeues unfinished leases when they expire).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["cancel_all", "run_every", "wait_drained"]

log = logging.getLogger(__name__)

#: how often ``wait_drained`` looks again: leases end in several ways (result, release, expiry),
#: so polling is the simplest honest wait
DRAIN_POLL_S = 0.1


def run_every(interval_s: float, fn: Callable[[], Awaitable[Any]], what: str) -> asyncio.Task[None]:
    """Call ``fn`` every ``interval_s`` seconds (the first call one interval from now) until the
    returned task is cancelled. An exception in a call is logged as "<what> failed; will retry"."""
    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except Exception:
                log.exception("%s failed; will retry", what)
    return asyncio.create_task(loop(), name=what)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have stopped (their exceptions are dropped)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_drained(busy: Callable[[], bool], timeout_s: float) -> bool:
    """Wait until ``busy()`` is false, at most ``timeout_s`` seconds; True if it went idle in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while busy():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(DRAIN_POLL_S)
    return True
