"""Handing out leases: one lease request, from the pick to the assignments of its reply.

Why its own part: a lease reply is the board's hottest path and the one with the most steps in a fixed order (the
policy's pick, trust's screen, a spot check, the grant, the commit queued but not awaited, trust's second
instance, the assignments with each job's envelope once), while the board's other calls only commit what
changed. Kept apart, that order reads in one place and the board stays the job life cycle and the wiring.

The commit of a lease is queued before the reply goes out and not waited for (hub/lease_writes.py: what waits for
it instead, what a crash costs); :meth:`Handout.lease` tracks it so every later write about the task lands after it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from hub.dispatcher import Dispatcher
from hub.envelopes import JobEnvelope
from hub.fleet import AgentState, Fleet
from hub.lease_writes import LeaseWrites
from hub.leases import LeaseTable
from hub.queues import JobQueues
from hub.records import JobState, TaskRow, TaskState
from hub.store import Store
from hub.trust.trust import Trust
from jobs.protocol import Assignment

__all__ = ["Handout"]

log = logging.getLogger(__name__)


class Handout:
    """Answers lease requests for a board (``Board.lease``, ``Board.leased_envelope``, ``Board.retry_after``)."""

    def __init__(self, store: Store, clock: Callable[[], float], queues: JobQueues, fleet: Fleet,
                 leases: LeaseTable, dispatcher: Dispatcher, trust: Trust, lease_writes: LeaseWrites,
                 stats: Counter[str]) -> None:
        self.store, self.clock = store, clock
        self._queues, self._fleet, self._leases, self._dispatcher = queues, fleet, leases, dispatcher
        self.trust, self._lease_writes, self._stats = trust, lease_writes, stats

    async def lease(self, agent_id: str, slots: int, wait_s: float,
                    have: Mapping[str, str] | None = None) -> list[Assignment]:
        """Hand out up to ``slots`` tasks, long-polling up to ``wait_s`` for the first one. ``have``: the
        envelopes the agent holds (``LeaseRequest.have``), left out of the assignments (hub/envelopes.py)."""
        agent = self._fleet.seen(agent_id)
        picked = await self._dispatcher.pick(agent, slots, wait_s)
        picked, back = self.trust.screen(agent, picked)   # never two instances of one unit to one agent
        self._queues.restore(back, ready=True)
        picked = await self._spot_check(agent, picked, slots)
        if not picked:
            return []
        writes = self._leases.grant(agent, picked, self.clock())
        granted = [(task, task.lease_id) for task in picked]
        starting = [job for job in {task.job_id: self._queues.job(task.job_id) for task in picked}.values()
                    if job.state == JobState.QUEUED]
        for job in starting:   # (as its tasks are leased in memory: views show both at once)
            job.state = JobState.RUNNING
        # One write with the jobs it starts, queued now (its place in the store's order; committed while the reply
        # travels, on SQLite as the step that writes it ends: hub/sqlite_writer.py); the reply does not wait for it
        # (hub/lease_writes.py: what waits for it instead, what a crash costs).
        lease_write = self.store.save_leases(writes, [dataclasses.replace(job) for job in starting])
        self._lease_writes.track((task.id for task in picked), self._lease_landed(lease_write, granted))
        self._leases.commit(picked)
        await self.trust.leased(agent, picked)   # may queue a second instance to run in parallel
        # Only leases still this agent's: while trust's records were written, the job may have been cancelled or
        # the agent's leases released (quarantine, a lost agent), and those tasks are no longer its to run.
        picked = [task for task, lease_id in granted if self._leases.holds(task, agent.row.id, lease_id)]
        self._stats["leases"] += len(picked)
        assignments, envelopes = self._leases.assignments(picked, have)
        self._stats["envelopes_sent"] += envelopes.sent
        self._stats["envelopes_omitted"] += envelopes.omitted
        self._stats["envelopes_to_fetch"] += envelopes.to_fetch
        return assignments

    def leased_envelope(self, agent_id: str, job_id: str) -> JobEnvelope:
        """A job's envelope for an agent holding a lease of one of its tasks (``GET /v1/jobs/{id}/envelope``)."""
        entry = self._leases.leased_envelope(agent_id, job_id)
        self._stats["envelopes_fetched"] += 1
        return entry

    async def _lease_landed(self, lease_write: Awaitable[None], granted: list[tuple[TaskRow, str | None]]) -> None:
        """After a lease reply: its commit landed, or it failed and the leases still current are taken back
        (their agent's results will be refused as expired leases; a job's start is written again with its next
        change)."""
        try:
            await lease_write
        except Exception:
            log.exception("a lease commit failed: %d leases taken back", len(granted))
            self._leases.undo([task for task, lease_id in granted
                               if task.state == TaskState.LEASED and task.lease_id == lease_id])

    def retry_after(self, agent_id: str) -> float | None:
        """How long an agent a lease request found nothing for should wait before asking again (hub/pacing.py)."""
        agent = self._fleet.agents.get(agent_id)
        return self._dispatcher.retry_after(agent) if agent is not None else None

    async def _spot_check(self, agent: AgentState, picked: list[TaskRow], slots: int) -> list[TaskRow]:
        """Now and then give an untrusted agent an instance of a unit whose answer is known (hub/trust/)."""
        room = self._leases.allowance(agent, slots)   # what it may get now: its capacity counts, not what it asked
        unit = self.trust.spot_candidate(agent) if self._dispatcher.leasing and agent.refused is None and room > 0 \
            else None
        if unit is None:
            return picked
        row = self.trust.new_instance(unit)
        job = self._queues.job(unit.job_id)
        await self.trust.add_rows(job, [row])
        self._queues.take(job.id, [row])
        if len(picked) >= room:   # it takes the place of the last task picked, which goes back first in line
            self._queues.restore(picked[-1:], ready=True)
            picked = picked[:-1]
        return [*picked, row]
