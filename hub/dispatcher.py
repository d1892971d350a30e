"""Dispatch: the board's policy chooses work for an asking agent, long-polling until there is some.

Before the policy looks, the lease table may refuse the agent (its gates) and holdbacks may keep
particular tasks from it for this one request (they return to the front of their queues after).
A request that finds nothing parks in the :class:`~hub.wakeups.WakeIndex` under its agent's capability
class. When tasks become ready (a submission, a requeue, a released backoff, a new instance of a unit:
the queue index tells the dispatcher, once per job per turn of the event loop), only waiters that may
run them are woken, about as many as the tasks can use; a woken waiter hands on what it did not take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container, Iterable, Mapping

from hub import waits
from hub.config import HubConfig
from hub.dispatch.capable import CapableIndex
from hub.dispatch.classes import CapClass, capability_class
from hub.fleet import AgentState, Fleet
from hub.leases import LeaseTable
from hub.pacing import PollPacing
from hub.protocols import DispatchPolicy, DispatchTimer, Holdback
from hub.queues import JobQueues
from hub.records import TaskRow
from hub.wakeups import Arrival, Waiter, WakeIndex

__all__ = ["DispatchContext", "Dispatcher"]


class DispatchContext:
    """The :class:`~hub.protocols.DispatchView` a board hands its policy: queues, fleet and clock."""

    def __init__(self, queues: JobQueues, fleet: Fleet, config: HubConfig, clock: Callable[[], float]) -> None:
        self._queues, self._fleet, self._config, self._clock = queues, fleet, config, clock
        self._capable = CapableIndex(queues, fleet)
        #: job id -> (presence version, capable version, how many connected agents are capable)
        self._counts: dict[str, tuple[int, int, int]] = {}
        #: agents whose standing changed outside their own pick (a gate began refusing one; one was told to
        #: pause): versions ``_noted_base`` .. ``noted_version``
        self._noted: list[str] = []
        self._noted_base = 0

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

    def is_connected(self, agent: AgentState) -> bool:
        return self._fleet.is_connected(agent, self._clock())

    def connected_ids(self) -> Container[str]:
        presence = self._fleet.presence
        presence.refresh(self._clock())
        return presence.members.keys()

    def stays_until(self, agent: AgentState) -> float | None:
        presence, now = self._fleet.presence, self._clock()
        presence.observe(now)
        return presence.stays_until(agent, now)

    def note(self, agent: AgentState) -> None:
        """The agent's standing changed outside a pick of its own (see :meth:`noted_since`)."""
        self._noted.append(agent.row.id)
        if len(self._noted) > 8192:
            del self._noted[:4096]
            self._noted_base += 4096

    def noted_since(self, version: int) -> tuple[int, list[str] | None]:
        end = self._noted_base + len(self._noted)
        if version < self._noted_base:
            return end, None
        return end, self._noted[version - self._noted_base:]

    def idle(self) -> Iterable[AgentState]:
        presence = self._fleet.presence
        presence.refresh(self._clock())
        return presence.idle.values()

    def idle_ids(self) -> Container[str]:
        presence = self._fleet.presence
        presence.refresh(self._clock())
        return presence.idle.keys()

    def slots_version(self) -> int:
        return self._fleet.presence.slots_version

    def slots_since(self, version: int) -> list[str] | None:
        return self._fleet.presence.slots_since(version)

    def agents(self) -> Mapping[str, AgentState]:
        return self._fleet.agents

    def reports_version(self) -> int:
        return self._fleet.reports_version

    def reports_since(self, version: int) -> list[AgentState] | None:
        return self._fleet.reports_since(version)

    def presence_version(self) -> int:
        return self._fleet.presence.version

    def presence_since(self, version: int) -> list[tuple[str, bool]] | None:
        return self._fleet.presence.changes_since(version)

    def capable(self, job_id: str) -> set[str]:
        return self._capable.capable(job_id)

    def capable_connected(self, job_id: str) -> int:
        """Connected agents meeting the job's requirements, counted once and then kept by the presence log."""
        capable = self._capable.capable(job_id)
        presence = self._fleet.presence
        presence.refresh(self._clock())
        version, reports = presence.version, self._capable.version
        cached = self._counts.get(job_id)
        if cached is not None and cached[1] == reports:
            changes = presence.changes_since(cached[0])
            if changes is not None:
                count = cached[2]
                for agent_id, joined in changes:
                    if agent_id in capable:
                        count += 1 if joined else -1
                self._counts[job_id] = (version, reports, count)
                return count
        if len(self._counts) > 64 and len(self._counts) > 2 * len(self._queues):   # finished jobs: forget
            self._counts = {j: c for j, c in self._counts.items() if j in self._queues}
        members = presence.members
        count = len(capable.intersection(members)) if len(capable) < len(members) else sum(
            1 for agent_id in members if agent_id in capable)
        self._counts[job_id] = (version, reports, count)
        return count


class Dispatcher:
    """Runs the policy for lease requests; ``leasing = False`` ends every request (shutdown)."""

    def __init__(self, policy: DispatchPolicy, queues: JobQueues, fleet: Fleet, leases: LeaseTable,
                 config: HubConfig, clock: Callable[[], float]) -> None:
        self.policy, self.config, self.clock = policy, config, clock
        self.context = DispatchContext(queues, fleet, config, clock)
        leases.on_later = self.context.note   # a task left an agent outside its pick: policies look again
        fleet.presence.on_moved = self.context.note   # a clock step back moved its seen or pause time
        self._queues, self._leases, self._fleet = queues, leases, fleet
        self._holdbacks: list[Holdback] = []
        self._timers: list[DispatchTimer] = []
        self.waiters = WakeIndex(self._may_run)
        self._classes: dict[str, tuple[object, CapClass]] = {}   # agent id -> (its caps, their class)
        self._arrived: dict[str, int] = {}                         # job id -> tasks ready since the last flush
        self._flush_handle: asyncio.Handle | None = None
        self.leasing = True
        queues.on_ready = self.work_arrived
        self.pacing = PollPacing(config, lambda: len(fleet.online()), clock)

    def retry_after(self, agent: AgentState) -> float | None:
        """The pause to ask of an agent a lease request found nothing for (None: ask again at once).

        An agent whose class may run queued work is not paused: a policy kept that work for another agent
        this time, and may give it to this one when asked again."""
        if self.has_work_for(agent):
            return None
        pause = self.pacing.retry_after()
        if pause is not None:
            self._fleet.pause(agent, pause)
            self.context.note(agent)   # it is free later than a policy may have counted
        return pause

    def add_holdback(self, holdback: Holdback) -> None:
        self._holdbacks.append(holdback)

    def time_dispatch(self, timer: DispatchTimer) -> None:
        self._timers.append(timer)

    def wake(self) -> None:
        """Every waiting request looks again (the board stops leasing)."""
        self.waiters.wake_all()

    # -- who to wake ------------------------------------------------------------------------------
    def class_of(self, agent: AgentState) -> CapClass:
        """The agent's capability class (recomputed only when it re-registers with a new report)."""
        cached = self._classes.get(agent.row.id)
        if cached is not None and cached[0] is agent.caps:
            return cached[1]
        cls = capability_class(agent.caps)
        self._classes[agent.row.id] = (agent.caps, cls)
        return cls

    def _may_run(self, job_id: str, cls: CapClass) -> bool:
        job = self._queues.get_job(job_id)
        return job is not None and cls.may_run(self._queues.requirements(job_id), job.kind)

    def has_work_for(self, agent: AgentState) -> bool:
        """Whether queued work exists that the agent's class may run (a policy may still keep it for another)."""
        cls = self.class_of(agent)
        return any(self.waiters.matches(job_id, cls) for job_id in self._queues.waiting())

    def work_arrived(self, job_id: str, tasks: int) -> None:
        """The queue index says: ``tasks`` of the job became ready. Waiters are woken once per loop turn."""
        self._arrived[job_id] = self._arrived.get(job_id, 0) + tasks
        if self._flush_handle is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:   # no loop (a board being built): nobody can be waiting
                self._arrived.clear()

    def _flush(self) -> None:
        self._flush_handle = None
        arrived, self._arrived = self._arrived, {}
        for job_id, tasks in arrived.items():
            queued = self._queues.queued(job_id)
            if queued:
                self.waiters.wake_for(Arrival(job_id), min(tasks, queued))

    def _hand_on(self, waiter: Waiter | None, picked: list[TaskRow]) -> None:
        """A woken waiter is done with its share: what it did not take goes to a waiter that has not tried."""
        if waiter is None or waiter.arrival is None:
            return
        arrival = waiter.arrival
        unused = waiter.share - sum(1 for task in picked if task.job_id == arrival.job_id)
        queued = self._queues.queued(arrival.job_id)
        if unused > 0 and queued and arrival.handoffs_left > 0:
            arrival.handoffs_left -= self.waiters.wake_for(arrival, min(unused, queued, arrival.handoffs_left))

    # -- picking ----------------------------------------------------------------------------------
    async def pick(self, agent: AgentState, slots: int, wait_s: float) -> list[TaskRow]:
        """Up to ``slots`` tasks for the agent, taken from the queues; waits up to ``wait_s`` for the first."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.config.max_poll_wait_s)
        woken: Waiter | None = None
        picked: list[TaskRow] = []
        try:
            while True:
                # Asked again after each wait: a concurrent request of the same agent may have filled it.
                allowed = self._leases.allowance(agent, slots)
                if not self.leasing or allowed == 0:
                    return []
                was_refused = agent.refused is not None
                if self._leases.refusal(agent):
                    if not was_refused:
                        self.context.note(agent)   # policies that keep facts about other agents look again
                    return []
                picked = self._pick_now(agent, allowed)
                self._hand_on(woken, picked)
                woken = None
                if picked:
                    if self._leases.capacity(agent) - len(agent.running) <= len(picked):
                        self.waiters.wake_agent(agent.row.id)   # its other polls have no room left: they answer
                    return picked
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                waiter = self.waiters.park(agent, allowed, self.class_of(agent))
                parked_at = time.perf_counter()
                try:
                    await asyncio.wait_for(waiter.woken.wait(), left)
                except TimeoutError:
                    return []
                finally:
                    waits.add(time.perf_counter() - parked_at)   # the lease's service time leaves it out
                    self.waiters.unpark(waiter)
                    if waiter.woken.is_set():
                        woken = waiter
                self._fleet.saw(agent)
        finally:
            self._hand_on(woken, [])   # cancelled, stopped or refused after a wake-up: its share goes on

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
