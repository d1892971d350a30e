"""A job's end: its changed tasks committed, its state decided, its waiters answered, its memory freed.

Why its own part: every path that changes tasks (results, a release, an expiry, a cancel, a restart) ends in the
same commit, and only that commit may finish a job: it decides the job's state from its task counts (set before
any await, so two concurrent calls never both finish it), commits it with the tasks (and results, and a new best
task), then hands the committed view to the job's waiters from memory and drops the job from every part. Kept in
one place, the order (lease commit landed -> commit -> waiters -> forget) cannot drift between callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from hub.best import BestTasks
from hub.lease_writes import LeaseWrites
from hub.leases import LeaseTable
from hub.ledger import ResultLedger
from hub.queues import JobQueues
from hub.readmodel import BoardView, job_summary
from hub.records import JobRow, JobState, ResultRow, TaskRow, TaskState
from hub.store import Store
from hub.submitter_faults import SubmitterFaults
from hub.trust.trust import Trust

__all__ = ["JobCompletion"]


class JobCompletion:
    """Commits what changed in a job and finishes it when every task is terminal; answers its waiters."""

    def __init__(self, store: Store, clock: Callable[[], float], queues: JobQueues, leases: LeaseTable,
                 ledger: ResultLedger, trust: Trust, submitter_faults: SubmitterFaults, best: BestTasks,
                 view: BoardView, lease_writes: LeaseWrites, emit: Callable[..., None]) -> None:
        self.store, self.clock = store, clock
        self._queues, self._leases, self._ledger = queues, leases, ledger
        self.trust, self.submitter_faults, self.best, self.view = trust, submitter_faults, best, view
        self._lease_writes, self._emit = lease_writes, emit
        #: active job id -> its waiters, each handed the job's final view when it finishes (no store read behind the
        #: next commit; one future per waiter, set directly: its request goes on in the loop's next turn)
        self._finished: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}

    async def maybe_finish(self, job_id: str, changed: Sequence[TaskRow], cancelled: bool = False,
                           results: Sequence[ResultRow] = ()) -> None:
        """Persist ``changed`` tasks (and results), finishing the job if every task is terminal."""
        await self._lease_writes.settled(task.id for task in changed)   # a task's lease lands before its next row
        job = self._queues.get_job(job_id)
        if job is None or job.state.terminal:  # finished by a concurrent call: just persist
            if results:
                await self.store.accept_results(results, changed, [])
            elif changed:
                await self.store.save_tasks(changed)
            return
        counts = self._queues.counts(job_id)
        terminal = (counts[TaskState.DONE] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
                    + counts[TaskState.INVALID])
        jobs: list[JobRow] = []
        finishing = cancelled or terminal >= job.n_tasks   # this call ends the job (set before any await)
        if finishing:
            if cancelled:
                job.state = JobState.CANCELLED
            elif counts[TaskState.FAILED]:
                job.state = JobState.FAILED
                failed = next(t for t in self._queues.job_tasks(job_id) if t.state == TaskState.FAILED)
                job.error = f"{counts[TaskState.FAILED]} of {job.n_tasks} tasks failed; " \
                            f"first: task {failed.idx}: {failed.error}"
            else:
                job.state = JobState.SUCCEEDED
            job.finished_at = self.clock()
            jobs.append(job)
        elif job.state == JobState.QUEUED and counts[TaskState.LEASED] + counts[TaskState.DONE]:
            job.state = JobState.RUNNING
            jobs.append(job)
        if self.best.changed(job_id) and job not in jobs:   # a new best task is committed with its result
            jobs.append(job)
        if results:
            await self.store.accept_results(results, changed, jobs)
        elif changed or jobs:
            await self.store.save_tasks(changed, jobs)
        if finishing:
            waiting = self._finished.pop(job_id, None)
            if waiting:
                final = job_summary(job, self.view.counts(job_id))   # as committed just above
                for waiter in waiting:
                    if not waiter.done():
                        waiter.set_result(final)
            self.submitter_faults.forget(t.id for t in self._queues.job_tasks(job_id))
            self.trust.forget(job)
            self._ledger.forget(self._queues.drop_job(job_id))
            self._leases.envelopes.forget(job_id)
            self._emit("job_finished", job=job_id, name=job.name, state=job.state.value)
            if waiting:   # their replies go out first, before what follows this commit (trust records, the next pick)
                await asyncio.sleep(0)

    async def wait_job(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's final view when it finishes within ``timeout_s`` (None: it did not, or was not active).

        The view is the one committed as the job finished, handed over from memory: a waiter reading it
        from the store instead would queue behind the commits that follow (trust records, the next job)."""
        if job_id not in self._queues or timeout_s <= 0:
            return None
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting = self._finished.setdefault(job_id, set())
        waiting.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            return None
        finally:
            waiting.discard(waiter)
            if not waiting and self._finished.get(job_id) is waiting:
                del self._finished[job_id]
