"""The queue index: the active jobs, their tasks by state, and which tasks wait, in what order.

Jobs are ordered by priority, then age; each job has a FIFO of its queued task ids; a task in
retry backoff waits in a heap until it is due. Policies see this through the query half of
:class:`JobQueues` (:class:`~hub.protocols.QueueView`): they *ask* (``waiting``, ``peek``,
``queued``) and *take* what they choose (``take``, ``take_first``); only the board changes task
states (``set_state`` keeps the per-job counts in step). Whoever sets ``on_ready`` hears of every task
that becomes ready (the dispatcher wakes waiting agents with it).
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, ValuesView

from hub.records import JobRow, TaskRow, TaskState
from jobs.requirements import Requirements

__all__ = ["JobQueues"]


class JobQueues:
    """Active jobs and their tasks; the ready queues, their order, and the retry backoffs."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRow] = {}
        self._tasks: dict[str, TaskRow] = {}
        self._counts: dict[str, Counter[TaskState]] = {}
        self._requirements: dict[str, Requirements] = {}
        self._ready: dict[str, deque[str]] = {}             # job id -> queued task ids
        self._order: list[tuple[int, float, str]] = []      # (-priority, created, job id), sorted
        self._delayed: list[tuple[float, str]] = []         # (ready at, task id): retry backoff
        #: told (job id, how many) whenever tasks join a queue: new, requeued, released from backoff, put back
        self.on_ready: Callable[[str, int], None] | None = None

    def _ready_now(self, job_id: str, n: int = 1) -> None:
        if self.on_ready is not None and n:
            self.on_ready(job_id, n)

    # -- the index --------------------------------------------------------------------------------
    def add_job(self, job: JobRow, tasks: Iterable[TaskRow] = ()) -> None:
        """Index an active job (and tasks of it; queued ones join its queue in the order given)."""
        self._jobs[job.id] = job
        self._counts[job.id] = Counter()
        self._requirements[job.id] = Requirements.from_dict(job.requires)
        self._ready[job.id] = deque()
        bisect.insort(self._order, (-job.priority, job.created_at, job.id))
        self.add_tasks(tasks)

    def add_tasks(self, tasks: Iterable[TaskRow]) -> None:
        ready: Counter[str] = Counter()
        for task in tasks:
            self._tasks[task.id] = task
            self._counts[task.job_id][task.state] += 1
            if task.state == TaskState.QUEUED:
                self._ready[task.job_id].append(task.id)
                ready[task.job_id] += 1
        for job_id, n in ready.items():
            self._ready_now(job_id, n)

    def drop_job(self, job_id: str) -> JobRow:
        """Forget a finished job and its tasks."""
        job = self._jobs.pop(job_id)
        del self._requirements[job_id], self._ready[job_id], self._counts[job_id]
        self._order = [entry for entry in self._order if entry[2] != job_id]
        for i in range(job.n_tasks):
            self._tasks.pop(f"{job_id}.{i}", None)
        return job

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def get_job(self, job_id: str) -> JobRow | None:
        return self._jobs.get(job_id)

    def jobs(self) -> ValuesView[JobRow]:
        """Active jobs, in the order the board took them on."""
        return self._jobs.values()

    def by_priority(self) -> Iterator[JobRow]:
        """Active jobs: highest priority first, then the oldest."""
        for _, _, job_id in self._order:
            yield self._jobs[job_id]

    def __len__(self) -> int:
        return len(self._jobs)

    def task(self, task_id: str) -> TaskRow | None:
        return self._tasks.get(task_id)

    def job_tasks(self, job_id: str, limit: int | None = None) -> list[TaskRow]:
        n = self._jobs[job_id].n_tasks
        return [self._tasks[f"{job_id}.{i}"] for i in range(n if limit is None else min(n, limit))]

    def counts(self, job_id: str) -> Mapping[TaskState, int]:
        return self._counts[job_id]

    def set_state(self, task: TaskRow, state: TaskState) -> None:
        counts = self._counts[task.job_id]
        counts[task.state] -= 1
        counts[state] += 1
        task.state = state

    # -- queueing ---------------------------------------------------------------------------------
    def enqueue(self, task: TaskRow, front: bool = False) -> None:
        if front:
            self._ready[task.job_id].appendleft(task.id)
        else:
            self._ready[task.job_id].append(task.id)
        self._ready_now(task.job_id)

    def delay(self, task: TaskRow, ready_at: float) -> None:
        heapq.heappush(self._delayed, (ready_at, task.id))

    def release_due(self, now: float) -> bool:
        """Queue the retries whose backoff has passed; whether any were."""
        released = False
        while self._delayed and self._delayed[0][0] <= now:
            _, task_id = heapq.heappop(self._delayed)
            task = self._tasks.get(task_id)
            if task is not None and task.state == TaskState.QUEUED:
                self._ready[task.job_id].append(task_id)
                self._ready_now(task.job_id)
                released = True
        return released

    def clear(self, job_id: str) -> list[TaskRow]:
        """Empty the job's queue; the queued tasks that were in it."""
        queue = self._ready[job_id]
        tasks = [task for t in queue if (task := self._tasks.get(t)) is not None and task.state == TaskState.QUEUED]
        queue.clear()
        return tasks

    def past_deadline(self, now: float) -> list[TaskRow]:
        """Empty the queues of jobs whose deadline has passed; the queued tasks that were in them."""
        out: list[TaskRow] = []
        for job in self._jobs.values():
            if job.deadline_at is not None and job.deadline_at <= now and self._ready[job.id]:
                out += self.clear(job.id)
        return out

    def withhold(self, task_ids: Iterable[str]) -> list[TaskRow]:
        """Take these tasks out of their queues for a moment; ``restore`` puts them back at the front."""
        out = []
        for task_id in task_ids:
            task = self._tasks.get(task_id)
            queue = self._ready.get(task.job_id) if task is not None else None
            if task is not None and queue and task_id in queue:
                queue.remove(task_id)
                out.append(task)
        return out

    def restore(self, withheld: Sequence[TaskRow], ready: bool = False) -> None:
        """Put tasks back at the front of their queues; ``ready``: others may take them now (tell ``on_ready``),
        not just a holdback's moment out of one agent's sight."""
        for task in reversed(withheld):
            queue = self._ready.get(task.job_id)
            if queue is not None:
                queue.appendleft(task.id)
                if ready:
                    self._ready_now(task.job_id)

    # -- QueueView: what policies ask and take ------------------------------------------------------
    def waiting(self) -> Iterator[str]:
        ready = self._ready
        for _, _, job_id in self._order:
            if ready[job_id]:
                yield job_id

    def job(self, job_id: str) -> JobRow:
        return self._jobs[job_id]

    def requirements(self, job_id: str) -> Requirements:
        return self._requirements[job_id]

    def queued(self, job_id: str) -> int:
        queue = self._ready.get(job_id)
        return len(queue) if queue is not None else 0

    def leased(self, job_id: str) -> int:
        return self._counts[job_id][TaskState.LEASED]

    def is_queued(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        return task is not None and task.state == TaskState.QUEUED

    def peek(self, job_id: str, limit: int) -> list[TaskRow]:
        out: list[TaskRow] = []
        if limit <= 0:
            return out
        for task_id in self._ready[job_id]:
            task = self._tasks.get(task_id)
            if task is not None and task.state == TaskState.QUEUED:
                out.append(task)
                if len(out) >= limit:
                    break
        return out

    def take(self, job_id: str, tasks: Sequence[TaskRow]) -> None:
        queue = self._ready[job_id]
        wanted = {task.id for task in tasks}
        kept: list[str] = []
        while wanted:
            if not queue:
                queue.extendleft(reversed(kept))
                raise ValueError(f"tasks {sorted(wanted)} are not queued in job {job_id}")
            task_id = queue.popleft()
            if task_id in wanted:
                wanted.discard(task_id)
            else:
                kept.append(task_id)
        queue.extendleft(reversed(kept))

    def take_first(self, job_id: str, limit: int) -> list[TaskRow]:
        queue = self._ready[job_id]
        out: list[TaskRow] = []
        while queue and len(out) < limit:
            task = self._tasks.get(queue.popleft())
            if task is not None and task.state == TaskState.QUEUED:
                out.append(task)
        return out
