"""A circuit breaker per board: stop calling a board that keeps failing, probe it after a pause.

closed -> (``threshold`` consecutive failures) -> open -> (``cooldown_s``) -> half-open: one probe
call goes through; success closes the breaker, failure opens it again with a doubled cool-down
(capped), so a dead board costs one request per cool-down instead of a flood.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["Breaker", "BreakerState"]

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 2.0, max_cooldown_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, name: str = "") -> None:
        self.name = name
        self.threshold = threshold
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open state, only one probe at a time)."""
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def success(self) -> None:
        if self.opened_at is not None and self.name:
            log.warning("circuit breaker for %s closed: it answers again", self.name)
        self.failures = 0
        self.opened_at = None
        self.cooldown_s = self.base_cooldown_s
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        if self._probing:
            self._probing = False
            self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
            self.opened_at = self.clock()
        elif self.failures >= self.threshold and self.opened_at is None:
            self.opened_at = self.clock()
        else:
            return
        if self.name:
            log.warning("circuit breaker for %s open after %d failures: next try in %.0f s", self.name,
                        self.failures, self.cooldown_s)
