"""Lease commits in flight: a lease reply goes out while the lease's commit is on its way to the store.

Why: on the path of one task (submit -> lease -> result -> job done) the lease's commit was one of three commits
a submitter waited for, and what it protects does not need it before the reply. The job was committed before the
lease (its submit is answered, or waits, only after that), and the result, which is what the submitter and the
agent rely on, is committed before either is told. What the lease's commit adds is that after a hub restart the
lease is still there, so the agent's result for it can be accepted.

What this keeps, and what it gives up:

- **Order.** Every later write about a leased task (its result, a release, an expiry, a cancel: all through
  ``JobCompletion.maybe_finish``, hub/completion.py; a checkpoint through the heartbeat) first waits for the
  lease's commit (:meth:`LeaseWrites.settled`), so the store never gets a task's later state before its lease.
  Such a write is a whole task row, so it is right even if the lease's own commit failed.
- **A lease commit that fails** (disk full, a fenced PostgreSQL hub) takes the lease back if it is still current:
  the task is queued again, the agent's heartbeat is told the lease is lost, its result is refused
  (``lease_expired``). Nothing stored refers to a lease the store does not hold.
- **The hub dies after the reply, before the commit lands.** After the restart the task is queued with the
  attempt it had (a lease uses no attempt), the agent's result for the lost lease is refused as an expired lease
  (``lease_expired``), and the task runs again. The agent's work on it is lost: the one cost, in a window of a
  commit's length (on SQLite the commit starts as the loop step that writes the reply ends). The trust rules
  hold: a refused result counts for nothing, so no agent gets two counted
  instances of one unit, and a held-back agent is still held back by what the store's rows say.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

__all__ = ["LeaseWrites"]


class LeaseWrites:
    """The lease commits not yet landed, by task id."""

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, task_ids: Iterable[str], landing: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``landing`` (the commit and what follows it; it must not raise) and note it for ``task_ids``
        until it ends."""
        ids = list(task_ids)
        task = asyncio.ensure_future(landing)
        for task_id in ids:
            self._pending[task_id] = task

        def landed(done: asyncio.Task[None]) -> None:
            for task_id in ids:
                if self._pending.get(task_id) is done:
                    del self._pending[task_id]
        task.add_done_callback(landed)
        return task

    async def settled(self, task_ids: Iterable[str]) -> None:
        """Wait until the lease commits of these tasks (those still in flight) have landed or failed. A caller
        cancelled meanwhile does not cancel the commit."""
        waits = {task for task_id in task_ids if (task := self._pending.get(task_id)) is not None}
        if waits:
            await asyncio.shield(asyncio.gather(*waits, return_exceptions=True))

    async def drain(self) -> None:
        """Wait for every lease commit in flight to land or fail (a board stopping: once its store has closed, which
        settles every queued write, so this never waits on a server that stopped answering)."""
        while self._pending:
            await asyncio.gather(*set(self._pending.values()), return_exceptions=True)
