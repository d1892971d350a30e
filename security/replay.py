"""Replay protection: a nonce may be used once per key within the signature skew window."""

from __future__ import annotations

import time
from collections import OrderedDict

from security.errors import Unauthorized

__all__ = ["ReplayCache"]


class ReplayCache:
    """Remembers (key, nonce) pairs until they could no longer pass the skew check.

    Entries are kept in arrival order, so expiring old ones is a walk from the front. The cap bounds
    memory under a flood; past it the oldest entries go first (they are the nearest to expiry).
    """

    def __init__(self, skew_s: float, max_entries: int = 1_000_000) -> None:
        self.skew_s = skew_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def check(self, keyid: str, nonce: str, now: float | None = None) -> None:
        current = now if now is not None else time.time()
        self._expire(current)
        entry = (keyid, nonce)
        if entry in self._seen:
            raise Unauthorized(f"replayed request: nonce already used by key {keyid}", code="replay")
        self._seen[entry] = current + 2 * self.skew_s
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._seen:
            entry, expiry = next(iter(self._seen.items()))
            if expiry > now:
                return
            del self._seen[entry]

    def __len__(self) -> int:
        return len(self._seen)
