"""What becomes of a task whose attempt ended without an answer: queued again, or failed.

A transient failure (timeout, OOM, a lost device, a vanished agent) is retried while the job's
attempts last, after a backoff that doubles with each attempt (a lost lease is retried at once:
the work itself did nothing wrong); a permanent one (bad parameters, unsupported work) fails the
task at once with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hub.config import HubConfig
from hub.leases import LeaseTable
from hub.queues import JobQueues
from hub.records import TaskRow, TaskState
from jobs.errors import FailureClass

__all__ = ["FREE_HAND_BACKS", "Retries"]

#: times one agent may hand one task back without using an attempt: a long pause is the volunteer's right
#: (agent/daemon/pausing.py), a loop of lease + hand back is a way to keep a job from ever ending. Counted
#: per agent, so a long task passed between several pausing gaming PCs is not charged for their pauses.
FREE_HAND_BACKS = 3
_HAND_BACKS_KEPT = 100_000


class Retries:
    def __init__(self, config: HubConfig, clock: Callable[[], float], queues: JobQueues, leases: LeaseTable,
                 stats: Counter[str]) -> None:
        self.config, self.clock, self.stats = config, clock, stats
        self._queues, self._leases = queues, leases
        self._handed_back: dict[tuple[str, str], int] = {}   # (task id, agent id) -> times it gave it back

    def hand_back(self, task: TaskRow) -> None:
        """Its lessee gave the lease back (a long pause, a shutdown): queued again at once, free of charge
        the first :data:`FREE_HAND_BACKS` times that agent does it; each one after that uses an attempt, as a
        lost lease does, so a task one agent hands back in a loop ends (failed) when its attempts do."""
        if len(self._handed_back) >= _HAND_BACKS_KEPT:   # (rare: forgiving all is cheaper than tracking age)
            self._handed_back.clear()
        key = (task.id, task.agent_id or "")
        times = self._handed_back[key] = self._handed_back.get(key, 0) + 1
        if times <= FREE_HAND_BACKS:
            self.requeue(task, count_attempt=False)
        else:
            self.fail_attempt(task, FailureClass.AGENT_LOST,
                              f"handed back {times} times by one agent (only {FREE_HAND_BACKS} are free of an attempt)")

    def requeue(self, task: TaskRow, count_attempt: bool, delay_s: float = 0.0) -> None:
        """Back to its job's queue (after ``delay_s``), with no lease and no progress."""
        self._leases.set_state(task, TaskState.QUEUED)
        if count_attempt:
            task.attempt += 1
        task.lease_id = task.agent_id = task.lease_expires_at = None
        task.progress, task.updated_at = 0.0, self.clock()
        if delay_s > 0:
            self._queues.delay(task, self.clock() + delay_s)
        else:
            self._queues.enqueue(task)

    def fail_attempt(self, task: TaskRow, failure: FailureClass, message: str) -> None:
        """Retry a transient failure while attempts remain; otherwise fail the task."""
        job = self._queues.job(task.job_id)
        task.error, task.error_class = message, failure.value
        if failure.transient and task.attempt < job.max_attempts:
            self.stats["retries"] += 1
            self.requeue(task, count_attempt=True,
                         delay_s=self.config.retry_backoff_s * 2 ** (task.attempt - 1)
                         if failure != FailureClass.AGENT_LOST else 0.0)
        else:
            self._leases.set_state(task, TaskState.FAILED)
            task.lease_id = task.lease_expires_at = None
            task.updated_at = self.clock()
