"""Per-source-address token buckets: how often one address may do something costly (register, search)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

__all__ = ["RateLimiter", "source_key"]


def source_key(remote: str | None) -> str:
    """What a per-address bound counts a caller by: its IPv4 address, or its IPv6 /64 (one host commonly holds a
    whole /64: counted per address, it would be 2^64 callers). Anything else (a Unix socket) is itself."""
    if not remote:
        return "?"
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RateLimiter:
    """``burst`` actions at once per key, refilled at ``per_min`` a minute. Memory is bounded: a key whose
    bucket is full again is forgotten, and at most ``max_keys`` keys are tracked (the oldest go first)."""

    def __init__(self, per_min: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate_s = per_min / 60.0
        self.burst = float(max(1, burst))
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate_s)

    def retry_after(self, key: str) -> float:
        """0.0 if ``key`` may act now, else the seconds until it may."""
        level = self._level(key, self.clock())
        if level >= 1.0:
            return 0.0
        return (1.0 - level) / self.rate_s if self.rate_s > 0 else float("inf")

    def take(self, key: str) -> None:
        """Count one action by ``key`` (call after :meth:`retry_after` said 0)."""
        now = self.clock()
        level = self._level(key, now) - 1.0
        self._buckets.pop(key, None)
        self._buckets[key] = (level, now)   # re-inserted: dict order is least recently used first
        if len(self._buckets) > self.max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
