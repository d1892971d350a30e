"""Who to wake when work appears: waiting lease requests indexed by capability class.

A board with 10,000 agents long-polling must not wake them all for one new task: each would run the
policy, find nothing and wait again. Waiters are kept per capability class (``hub/dispatch/classes.py``),
oldest first. When tasks of a job become ready, :meth:`WakeIndex.wake_for` wakes only waiters whose class
may run the job, oldest first across the classes (no class waits behind another for ever), and only as
many as the new tasks can use (their free slots add up to the number of tasks).

A wake-up is never lost: a woken waiter carries its share of an :class:`Arrival`; whatever it does not
take (a policy passed it over, a holdback kept the task from it, its request was cancelled) is handed on
to another waiter that has not tried this arrival yet (``Dispatcher``), up to :data:`HANDOFFS` extra
waiters per arrival. Past that, the tasks stay queued and every lease request looks at the queues before
it waits, so the next poll of a capable agent (within ``max_poll_wait_s`` for those waiting) finds them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from hub.dispatch.classes import CapClass
from hub.fleet import AgentState

__all__ = ["HANDOFFS", "Arrival", "Waiter", "WakeIndex"]

#: waiters an arrival may be handed on to beyond those it first woke (bounds the cost of work that
#: nobody waiting will take, e.g. one a policy keeps for a faster agent that is not waiting)
HANDOFFS = 32
_JOBS_CACHED = 10_000
#: (job, class) answers kept: a registered agent may re-register with a new report (a new class) at will
_MATCHES_CACHED = 200_000


@dataclass(eq=False)
class Arrival:
    """Tasks of one job that became ready, and the waiters that have had their chance at them."""

    job_id: str
    handoffs_left: int = HANDOFFS
    tried: set[str] = field(default_factory=set)   # agent ids


@dataclass(eq=False)
class Waiter:
    """One parked lease request."""

    agent: AgentState
    slots: int
    cls: CapClass
    seq: int
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    arrival: Arrival | None = None   # what woke it, and how many of those tasks it is meant for
    share: int = 0

    def wake(self, arrival: Arrival | None, share: int) -> None:
        self.arrival, self.share = arrival, share
        self.woken.set()


class WakeIndex:
    """Parked lease requests by capability class, each class in the order they parked."""

    def __init__(self, may_run: Callable[[str, CapClass], bool]) -> None:
        self._may_run = may_run          # (job id, class) -> whether a member may run the job
        self._by_class: dict[str, dict[Waiter, None]] = {}
        self._classes: dict[str, CapClass] = {}
        self._by_agent: dict[str, set[Waiter]] = {}
        self._match: dict[str, dict[str, bool]] = {}   # job id -> class key -> may run
        self._matches = 0                                # answers in _match (bounded: classes come and go)
        self._seq = itertools.count()
        self.woken = 0                   # waiters woken, all time (a figure for benchmarks)

    def __len__(self) -> int:
        return sum(len(ws) for ws in self._by_class.values())

    def park(self, agent: AgentState, slots: int, cls: CapClass) -> Waiter:
        waiter = Waiter(agent, slots, cls, next(self._seq))
        self._classes.setdefault(cls.key, cls)
        self._by_class.setdefault(cls.key, {})[waiter] = None
        self._by_agent.setdefault(agent.row.id, set()).add(waiter)
        return waiter

    def unpark(self, waiter: Waiter) -> None:
        waiters = self._by_class.get(waiter.cls.key)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self._by_class[waiter.cls.key], self._classes[waiter.cls.key]
        mine = self._by_agent.get(waiter.agent.row.id)
        if mine is not None:
            mine.discard(waiter)
            if not mine:
                del self._by_agent[waiter.agent.row.id]

    def matches(self, job_id: str, cls: CapClass) -> bool:
        if len(self._match) > _JOBS_CACHED or self._matches >= _MATCHES_CACHED:
            self._match.clear()
            self._matches = 0
        known = self._match.get(job_id)
        if known is None:
            known = self._match[job_id] = {}
        hit = known.get(cls.key)
        if hit is None:
            hit = known[cls.key] = self._may_run(job_id, cls)
            self._matches += 1
        return hit

    def forget_job(self, job_id: str) -> None:
        """The job is gone: drop what was cached about it."""
        self._matches -= len(self._match.pop(job_id, {}))

    def wake_for(self, arrival: Arrival, tasks: int) -> int:
        """Wake untried waiters that may run the arrival's job, oldest first, until their free slots cover
        ``tasks``; how many were woken."""
        job_id = arrival.job_id
        queues = [self._untried(ws, arrival.tried) for key, ws in self._by_class.items()
                  if self.matches(job_id, self._classes[key])]
        woken: list[Waiter] = []
        for _, waiter in heapq.merge(*queues, key=lambda item: item[0]):
            if tasks <= 0:
                break
            share = min(tasks, waiter.slots)
            tasks -= share
            woken.append(waiter)
            waiter.wake(arrival, share)
            arrival.tried.add(waiter.agent.row.id)
        for waiter in woken:
            self.unpark(waiter)
        self.woken += len(woken)
        return len(woken)

    @staticmethod
    def _untried(waiters: dict[Waiter, None], tried: set[str]) -> Iterator[tuple[int, Waiter]]:
        return ((w.seq, w) for w in waiters if w.agent.row.id not in tried)

    def wake_agent(self, agent_id: str) -> None:
        """The agent's parked requests look again (it has no room left: they answer at once)."""
        for waiter in list(self._by_agent.get(agent_id, ())):
            waiter.wake(None, 0)
            self.unpark(waiter)

    def wake_all(self) -> None:
        """Every waiter looks again (the board is stopping)."""
        for waiters in list(self._by_class.values()):
            for waiter in list(waiters):
                waiter.wake(None, 0)
                self.unpark(waiter)
