"""The board as views read it: job views, the status summary, the status page and metrics.

Nothing here changes the board. Active jobs are answered from memory (the live state), finished
ones from the store; the HTTP layer, the status page and the metrics collector read only this.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from hub.dispatch.explain import explain_waiting
from hub.fleet import AgentState, Fleet
from hub.protocols import DispatchPolicy, DispatchView
from hub.queues import JobQueues
from hub.records import JobRow, JobState, ResultRow, TaskRow, TaskState
from hub.store import Store
from jobs.requirements import Requirements, unmet
from security.errors import NotFound

__all__ = ["BoardView", "job_summary"]


def job_summary(job: JobRow, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": job.id, "name": job.name, "kind": job.kind, "state": job.state.value,
            "submitter": job.submitter_id, "priority": job.priority, "created_at": job.created_at,
            "finished_at": job.finished_at, "n_tasks": job.n_tasks, "tasks": counts, "error": job.error,
            "labels": job.labels, "report": job.report or None, "best": job.best}


class BoardView:
    """Read-only queries over one board's live state and its store."""

    def __init__(self, store: Store, clock: Callable[[], float], queues: JobQueues, fleet: Fleet,
                 stats: Counter[str], dispatch: DispatchView, policy: DispatchPolicy) -> None:
        self._store, self._clock = store, clock
        self._queues, self._fleet, self._stats = queues, fleet, stats
        self._dispatch, self._policy = dispatch, policy
        #: why the capable connected agents may not take a queued instance (set by the board: the trust
        #: part's rule that one agent never answers twice for one unit), or None
        self.instance_gate: Callable[[str, list[AgentState]], str | None] | None = None

    def now(self) -> float:
        return self._clock()

    @property
    def policy_name(self) -> str:
        return self._policy.name

    @property
    def stats(self) -> Mapping[str, int]:
        """Counters since start: leases, expired, retries, results_{accepted,failed,duplicate,rejected}."""
        return self._stats

    # -- agents -------------------------------------------------------------------------------------
    @property
    def agents(self) -> Mapping[str, AgentState]:
        return self._fleet.agents

    def online_agents(self) -> list[AgentState]:
        return self._fleet.online()

    # -- jobs and tasks -----------------------------------------------------------------------------
    def active_jobs(self, limit: int | None = None) -> list[JobRow]:
        """Jobs not yet finished: highest priority first, then the oldest."""
        return list(itertools.islice(self._queues.by_priority(), limit))

    def active_count(self) -> int:
        return len(self._queues)

    def job(self, job_id: str) -> JobRow | None:
        """The job if it is active."""
        return self._queues.get_job(job_id)

    async def find_job(self, job_id: str) -> JobRow | None:
        """The job, active or finished."""
        return self._queues.get_job(job_id) or await self._store.get_job(job_id)

    async def list_jobs(self, state: JobState | None = None, limit: int = 1000) -> list[JobRow]:
        return await self._store.list_jobs(state, limit)

    def counts(self, job_id: str) -> dict[str, int]:
        """Task states of an active job (non-zero ones)."""
        return {s.value: n for s, n in self._queues.counts(job_id).items() if n}

    def summary(self, job: JobRow) -> dict[str, Any]:
        """The job's summary: live counts while it is active (and its live row)."""
        live = self._queues.get_job(job.id)
        if live is not None:
            return job_summary(live, self.counts(job.id))
        return job_summary(job, {"done": job.n_tasks} if job.state == JobState.SUCCEEDED else {})

    def queued(self, job_id: str) -> int:
        return self._queues.queued(job_id)

    def task(self, task_id: str) -> TaskRow | None:
        """A task of an active job."""
        return self._queues.task(task_id)

    async def tasks(self, job_id: str, limit: int | None = None) -> list[TaskRow]:
        """The job's tasks in index order (live while it is active)."""
        if job_id in self._queues:
            return self._queues.job_tasks(job_id, limit)
        return (await self._store.get_tasks(job_id))[:limit]

    async def results(self, job_id: str) -> list[ResultRow]:
        return await self._store.get_results(job_id)

    def task_counts(self, job_id: str) -> Mapping[TaskState, int]:
        """An active job's tasks by state (the queue index's counters)."""
        return self._queues.counts(job_id)

    def requirements(self, job_id: str) -> Requirements:
        """An active job's requirements, as dispatch reads them."""
        return self._queues.requirements(job_id)

    def connected_agents(self) -> list[AgentState]:
        """Agents that can take work now (dispatch's view: seen recently, within their window)."""
        return self._dispatch.connected()

    def task_totals(self) -> Counter[TaskState]:
        """Tasks of the active jobs by state."""
        totals: Counter[TaskState] = Counter()
        for job in self._queues.jobs():
            totals.update(self._queues.counts(job.id))
        return totals

    def waiting_because(self, job_id: str) -> list[str]:
        """Why no connected agent takes the job's next queued task (empty if one can)."""
        reasons = explain_waiting(self._dispatch, job_id, self._policy.predictor)
        task = next(iter(self._queues.peek(job_id, 1)), None)
        if reasons or task is None or self.instance_gate is None:
            return reasons
        job, req = self._queues.job(job_id), self._queues.requirements(job_id)
        capable = [a for a in self._dispatch.connected() if not unmet(req, job.kind, a.caps)]
        why = self.instance_gate(task.id, capable)
        return [why] if why else []

    async def job_view(self, job_id: str) -> dict[str, Any]:
        job = await self.find_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", code="no_such_job")
        if job.id in self._queues:
            counts = self.counts(job.id)
        else:
            counts = dict(Counter(t.state.value for t in await self._store.get_tasks(job_id)))
        view = job_summary(job, counts)
        if job.id in self._queues and self._queues.queued(job.id):
            reasons = self.waiting_because(job.id)
            if reasons:
                view["waiting_because"] = reasons
        return view

    def status(self) -> dict[str, Any]:
        online = self.online_agents()
        return {
            "agents": {"registered": len(self._fleet.agents), "online": len(online),
                       "busy": sum(1 for a in online if a.running)},
            "jobs": {"active": len(self._queues)},
            "tasks": {state.value: n for state, n in self.task_totals().items()},
            "stats": dict(self._stats),
        }
