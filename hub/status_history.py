"""The status page's 24-hour history: per 10-minute bucket, attempts done and failed, agents connected and
the backlog; kept in the store so that a hub restart does not wipe the page's day.

BOINC's server status page shows the present only; an operator asks "is it better or worse than this
morning?", so the page keeps a day at a coarse grain. Counting is O(1) per settled attempt; levels (agents,
backlog) are sampled by the snapshot build, which runs once per interval anyway. The store is written at
most once per ``FLUSH_S`` (only the buckets that changed, at most two), and on a clean stop: a crash
loses at most the last ``FLUSH_S`` of counts, never the day.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from hub.records import HistoryBucket
from hub.store import Store

__all__ = ["BUCKET_S", "FLUSH_S", "HISTORY_S", "StatusHistory"]

log = logging.getLogger(__name__)

BUCKET_S = 600             # one bucket: 10 minutes
HISTORY_S = 24 * 3600      # the page shows a day: 144 buckets
FLUSH_S = 60.0             # the store is written at most this often


class StatusHistory:
    """The last day's buckets in memory (at most 145), read back from the store at start."""

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.buckets: dict[int, HistoryBucket] = {}     # bucket start (epoch s) -> its counts
        self._dirty: set[int] = set()
        self._flushed_at = float("-inf")

    @staticmethod
    def bucket_of(now: float) -> int:
        return int(now // BUCKET_S) * BUCKET_S

    async def load(self, now: float) -> None:
        """The stored buckets of the last day (a fresh hub: none); counts since start are kept on top."""
        if self.store is None:
            return
        for stored in await self.store.load_status_history(self.bucket_of(now) - HISTORY_S + BUCKET_S):
            start = int(stored.start)
            mine = self.buckets.get(start)
            self.buckets[start] = stored if mine is None else dataclasses.replace(
                stored, done=stored.done + mine.done, failed=stored.failed + mine.failed,
                agents=max(stored.agents, mine.agents), backlog=mine.backlog or stored.backlog)

    def count(self, now: float, ok: bool) -> None:
        """One settled attempt."""
        start = self.bucket_of(now)
        bucket = self.buckets.get(start) or HistoryBucket(float(start))
        self.buckets[start] = dataclasses.replace(bucket, done=bucket.done + ok, failed=bucket.failed + (not ok))
        self._dirty.add(start)

    def sample(self, now: float, agents: int, backlog: int) -> None:
        """The fleet and backlog now (the snapshot build's figures)."""
        start = self.bucket_of(now)
        bucket = self.buckets.get(start) or HistoryBucket(float(start))
        if bucket.agents < agents or bucket.backlog != backlog:
            self.buckets[start] = dataclasses.replace(bucket, agents=max(bucket.agents, agents), backlog=backlog)
            self._dirty.add(start)
        for old in [s for s in self.buckets if s <= start - HISTORY_S]:
            del self.buckets[old]

    def rows(self, now: float) -> list[dict[str, Any]]:
        """The last day, oldest first, one row per bucket (empty buckets included: the chart's x axis)."""
        end = self.bucket_of(now)
        rows = []
        for start in range(end - HISTORY_S + BUCKET_S, end + BUCKET_S, BUCKET_S):
            b = self.buckets.get(start) or HistoryBucket(float(start))
            rows.append({"start": start, "done": b.done, "failed": b.failed, "agents": b.agents,
                         "backlog": b.backlog})
        return rows

    def columns(self, now: float) -> dict[str, Any]:
        """The last day as columns, as the page reads it (144 buckets: a few KB in every frame)."""
        rows = self.rows(now)
        return {"bucket_s": BUCKET_S, "start": rows[0]["start"],
                **{key: [r[key] for r in rows] for key in ("done", "failed", "agents", "backlog")}}

    async def flush(self, now: float, force: bool = False) -> None:
        """Write the changed buckets, at most once per FLUSH_S unless forced (a clean stop). ``now`` is the
        board's wall clock: one set back (an NTP step) writes at once, or nothing would be written until the
        clock came back to the last write (an hour back: an hour a crash could lose, not ``FLUSH_S``)."""
        if self.store is None or not self._dirty or (not force and 0.0 <= now - self._flushed_at < FLUSH_S):
            return
        dirty, self._dirty = self._dirty, set()
        self._flushed_at = now
        try:
            await self.store.save_status_history([self.buckets[s] for s in sorted(dirty) if s in self.buckets],
                                                 self.bucket_of(now) - HISTORY_S)
        except Exception:
            self._dirty |= dirty          # the next flush tries again
            raise
