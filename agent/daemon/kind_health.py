"""A circuit breaker per job kind on this machine.

If one kind keeps failing here (a broken driver, a missing backend, a kernel that crashes), the
agent stops advertising it for a cool-down instead of eating the queue, and says why. Failures
that are the task's own fault (bad parameters, a timeout the submitter chose) do not count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.client.breaker import Breaker, BreakerState
from jobs.catalog import get_kind
from jobs.errors import FailureClass
from security.errors import PanalError

__all__ = ["KindHealth"]

log = logging.getLogger(__name__)
MACHINE_FAILURES = {FailureClass.CRASHED.value, FailureClass.DEVICE_LOST.value, FailureClass.ERROR.value,
                    FailureClass.OOM.value}


def _runs_code(kind: str) -> bool:
    try:
        return get_kind(kind).sandboxed
    except PanalError:
        return False


class KindHealth:
    def __init__(self, threshold: int = 3, cooldown_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self.breakers: dict[str, Breaker] = {}
        self.reasons: dict[str, str] = {}

    def record(self, kind: str, ok: bool, failure: str | None, message: str | None) -> bool:
        """Record an outcome; True when the set of kinds this agent should advertise changed.

        A kind that runs submitter code is not judged by its tasks: their crashes and OOMs are the
        code's, and one hostile submitter must not switch the kind off for every other submitter."""
        if _runs_code(kind):
            return False
        breaker = self.breakers.setdefault(kind, Breaker(self.threshold, self.cooldown_s, 3600.0, self.clock))
        before = breaker.state
        if ok:
            breaker.success()
            self.reasons.pop(kind, None)
        elif failure in MACHINE_FAILURES:
            if before == BreakerState.HALF_OPEN:
                breaker.allow()  # this task was the probe: its failure re-opens with a longer cool-down
            breaker.failure()
            if breaker.state == BreakerState.OPEN and before != BreakerState.OPEN:
                self.reasons[kind] = f"{breaker.failures} failures in a row here, last: {failure}: {message}"
                log.warning("kind %s disabled on this agent for %.0f s: %s", kind, breaker.cooldown_s,
                            self.reasons[kind])
        return (before == BreakerState.CLOSED) != (breaker.state == BreakerState.CLOSED)

    def disabled(self) -> dict[str, str]:
        """Kinds not to advertise now (open breakers); a half-open one is advertised again as a probe."""
        return {k: self.reasons.get(k, "") for k, b in self.breakers.items() if b.state == BreakerState.OPEN}

    def advertised(self, kinds: list[str]) -> list[str]:
        off = self.disabled()
        return [k for k in kinds if k not in off]
