"""Leases after their hand-out: kept alive by heartbeats, given back, or ended by the sweep.

Why its own part: a lease ends in one of three ways the agent does not control alike (it heartbeats, it hands the
task back, or it goes silent and the sweep ends the lease), and each must leave the task where a retry finds it:
a checkpoint committed after the lease's own commit, a hand-back requeued (no attempt used unless the task is
handed back too often), an expired or timed-out lease failed as ``agent_lost``/``timeout`` and retried. The sweep
also fails the queued tasks whose job deadline passed. The board commits what changed through its job life cycle
(``finish``, hub/completion.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from hub.config import HubConfig
from hub.fleet import Fleet
from hub.lease_writes import LeaseWrites
from hub.leases import LeaseTable
from hub.queues import JobQueues
from hub.records import TaskRow, TaskState
from hub.retries import Retries
from hub.settlement import Settlement
from hub.store import Store
from jobs.errors import FailureClass
from jobs.protocol_upkeep import HeartbeatLease, HeartbeatReply

__all__ = ["LeaseUpkeep"]

log = logging.getLogger(__name__)

#: commits a job's changed tasks, finishing the job when they were its last (``JobCompletion.maybe_finish``)
Finish = Callable[[str, Sequence[TaskRow]], Awaitable[None]]


class LeaseUpkeep:
    """Heartbeats, hand-backs and the expiry sweep of a board's leases."""

    def __init__(self, config: HubConfig, clock: Callable[[], float], store: Store, queues: JobQueues,
                 fleet: Fleet, leases: LeaseTable, retries: Retries, settlement: Settlement,
                 lease_writes: LeaseWrites, stats: Counter[str], emit: Callable[..., None], finish: Finish) -> None:
        self.config, self.clock, self.store = config, clock, store
        self._queues, self._fleet, self._leases, self._retries = queues, fleet, leases, retries
        self._settlement, self._lease_writes, self._stats = settlement, lease_writes, stats
        self._emit, self._finish = emit, finish

    async def heartbeat(self, agent_id: str, leases: Sequence[HeartbeatLease]) -> HeartbeatReply:
        """Extend the caller's leases; report the ones it no longer holds so it can stop them."""
        self._fleet.seen(agent_id)
        lost, checkpoints = self._leases.heartbeat(agent_id, leases)
        if checkpoints:  # a checkpoint is worth a commit: it is what a retry resumes from
            await self._lease_writes.settled(task.id for task in checkpoints)
            await self.store.save_tasks(checkpoints)
        return HeartbeatReply(self.config.lease_ttl_s, tuple(lost))

    async def release(self, agent_id: str, task_id: str, lease_id: str) -> None:
        """The agent gives a lease back (a long pause, shutting down): requeued at once, with no attempt used
        unless the task was handed back too often (hub/retries.py)."""
        task = self._queues.task(task_id)
        if task is None or not self._leases.holds(task, agent_id, lease_id):
            return
        self._retries.hand_back(task)
        await self._finish(task.job_id, [task])

    async def sweep(self) -> None:
        """Requeue expired leases (attempt + 1) and release retry backoffs that are due."""
        now = self.clock()
        self._queues.release_due(now)   # (queued again: the queue index wakes who may run them)
        changed: dict[str, list[TaskRow]] = {}
        for task in self._queues.past_deadline(now):   # nobody can run them in time any more
            self._leases.set_state(task, TaskState.FAILED)
            task.error, task.error_class, task.updated_at = "the job's deadline passed before it ran", "deadline", now
            changed.setdefault(task.job_id, []).append(task)
        for task in self._leases.expired(now):
            if self._leases.timed_out(task, now):   # heartbeated, but past the task's timeout + grace
                failure, why = FailureClass.TIMEOUT, (
                    f"the task ran past its timeout ({self._queues.job(task.job_id).timeout_s:g} s) and the "
                    f"hub's grace ({self.config.lease_timeout_grace_s:g} s): the board ended the lease")
            else:
                failure, why = FailureClass.AGENT_LOST, "the agent stopped heartbeating (lease expired)"
            log.info("lease of task %s on agent %s ended: %s (attempt %d)", task.id, task.agent_id, failure.value,
                     task.attempt)
            self._stats["expired"] += 1
            self._emit("lease_expired", task=task.id, agent=task.agent_id)
            self._settlement.settled(task.agent_id or "?", task, False, failure.value, {})
            self._retries.fail_attempt(task, failure, why)
            changed.setdefault(task.job_id, []).append(task)
        for job_id, tasks in changed.items():
            await self._finish(job_id, tasks)

