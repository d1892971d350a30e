"""How long an agent the board had nothing for should wait before asking again.

An idle fleet should cost the board almost nothing. Each idle agent's cycle is one long-poll
(``max_poll_wait_s``) and then a pause the board names in the lease reply (``retry_after_s``). The pause
grows with the fleet so that all idle agents together send about ``idle_polls_per_s`` requests a second
and keep at most half of ``max_long_polls`` parked at once; a small fleet gets no pause and asks again at
once, as before. Jitter (+-25%) keeps agents that went idle together from asking together. New work still
reaches a pausing agent: it stays queued, and the next request of a capable agent looks before it parks;
meanwhile the agents parked at that moment are woken for it (``hub/wakeups.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from hub.config import HubConfig

__all__ = ["PollPacing"]

#: the agent count is taken again after this many seconds of the board's clock
REFRESH_S = 5.0


class PollPacing:
    """The pause for an idle agent, from how many agents are around."""

    def __init__(self, config: HubConfig, count: Callable[[], int], clock: Callable[[], float],
                 rng: random.Random | None = None) -> None:
        self.config, self._count, self.clock = config, count, clock
        self._rng = rng or random.Random()
        self._agents, self._counted_at = 0, -REFRESH_S

    def agents(self) -> int:
        now = self.clock()
        if now - self._counted_at >= REFRESH_S or now < self._counted_at:
            self._agents, self._counted_at = self._count(), now
        return self._agents

    def pause_s(self, agents: int) -> float:
        """The pause (before jitter) for a fleet of ``agents``."""
        c = self.config
        wait = c.max_poll_wait_s
        by_rate = agents / c.idle_polls_per_s - wait if c.idle_polls_per_s > 0 else 0.0
        by_parked = 2 * agents * wait / c.max_long_polls - wait if c.max_long_polls > 0 else 0.0
        return min(max(c.min_poll_interval_s, by_rate, by_parked, 0.0), c.max_poll_interval_s)

    def retry_after(self) -> float | None:
        """Seconds to tell an idle agent, or None (ask again at once)."""
        pause = self.pause_s(self.agents())
        if pause <= 0:
            return None
        low = max(self.config.min_poll_interval_s, 0.75 * pause)
        return round(min(self._rng.uniform(low, max(low, 1.25 * pause)), self.config.max_poll_interval_s), 3)
