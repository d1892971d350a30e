"""Dispatch: the board's policy chooses work for an asking agent, long-polling until there is some.

Before the policy looks, the lease table may refuse the agent (its gates) and holdbacks may keep
particular tasks from it for this one request (they return to the front of their queues after).
A waiting request wakes whenever work may have appeared: a submission, a requeue, a released
backoff, results that finished tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hub.config import HubConfig
from hub.fleet import AgentState, Fleet
from hub.leases import LeaseTable
from hub.protocols import DispatchPolicy, DispatchTimer, Holdback
from hub.queues import JobQueues
from hub.records import TaskRow

__all__ = ["DispatchContext", "Dispatcher"]


class DispatchContext:
    """The :class:`~hub.protocols.DispatchView` a board hands its policy: queues, fleet and clock."""

    def __init__(self, queues: JobQueues, fleet: Fleet, config: HubConfig, clock: Callable[[], float]) -> None:
        self._queues, self._fleet, self._config, self._clock = queues, fleet, config, clock

    @property
    def queues(self) -> JobQueues:
        return self._queues

    @property
    def config(self) -> HubConfig:
        return self._config

    def now(self) -> float:
        return self._clock()

    def connected(self) -> list[AgentState]:
        return self._fleet.connected(self._clock())


class Dispatcher:
    """Runs the policy for lease requests; ``leasing = False`` ends every request (shutdown)."""

    def __init__(self, policy: DispatchPolicy, queues: JobQueues, fleet: Fleet, leases: LeaseTable,
                 config: HubConfig, clock: Callable[[], float]) -> None:
        self.policy, self.config, self.clock = policy, config, clock
        self.context = DispatchContext(queues, fleet, config, clock)
        self._queues, self._leases = queues, leases
        self._holdbacks: list[Holdback] = []
        self._timers: list[DispatchTimer] = []
        self._wakeup = asyncio.Event()
        self.leasing = True

    def add_holdback(self, holdback: Holdback) -> None:
        self._holdbacks.append(holdback)

    def time_dispatch(self, timer: DispatchTimer) -> None:
        self._timers.append(timer)

    def wake(self) -> None:
        """Work may have appeared: waiting requests look again."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def pick(self, agent: AgentState, slots: int, wait_s: float) -> list[TaskRow]:
        """Up to ``slots`` tasks for the agent, taken from the queues; waits up to ``wait_s`` for the first."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.config.max_poll_wait_s)
        while True:
            # Asked again after each wait: a concurrent request of the same agent may have filled it.
            allowed = self._leases.allowance(agent, slots)
            if not self.leasing or allowed == 0 or self._leases.refusal(agent):
                return []
            picked = self._pick_now(agent, allowed)
            if picked:
                return picked
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return []
            agent.last_seen = self.clock()

    def _pick_now(self, agent: AgentState, slots: int) -> list[TaskRow]:
        start = time.perf_counter()
        withheld = self._queues.withhold(task_id for holdback in self._holdbacks
                                         for task_id in holdback.held_back(agent, self.context))
        try:
            return self.policy.pick(self.context, agent, slots)
        finally:
            # Back at the front: the next agent with more memory should take them first.
            self._queues.restore(withheld)
            for timer in self._timers:
                timer(time.perf_counter() - start)
