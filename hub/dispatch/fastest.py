"""``fastest``: each task goes where it is predicted to finish soonest.

An asking agent takes a job's tasks only as far as the other connected agents could not finish
them earlier: another agent, counted from when it is predicted to have a free slot, finishes
``ceil((my_end - its_free_at) / its_runtime) - 1`` of them strictly before this agent would finish
one. A slow host therefore waits while faster ones can absorb the queue, and joins in when the
queue is longer than they can clear. Predictions learn from observed wall times (``predict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from hub.dispatch.predict import Predictor, candidate_jobs
from hub.fleet import available_until, derived

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow
    from jobs.requirements import Capabilities

__all__ = ["Fastest", "SoonestGate"]

#: an agent skipped for a job kind (e.g. by ``adaptive`` for its error rate)
Avoid = Callable[["AgentState", str], bool]


def _speed(caps: Capabilities) -> float:
    return max([caps.cpu_gflops, *(g.gflops_fp32 for g in caps.gpus)])


class SoonestGate:
    """How many of a job's queued tasks one asking agent should take under earliest-finish-first."""

    def __init__(self, view: DispatchView, agent: AgentState, predictor: Predictor, now: float,
                 avoid: Avoid | None = None) -> None:
        self.view, self.queues, self.agent, self.predictor, self.now = view, view.queues, agent, predictor, now
        self.avoid = avoid
        free_at = predictor.free_at
        # Fastest devices first: ``share`` adds what each rival finishes first and stops once they cover the
        # queue; the sum does not depend on the order, only how soon it stops does.
        self.others = sorted(((b, free_at(b, now)) for b in view.connected() if b is not agent and b.refused is None),
                             key=lambda item: -derived(item[0], "speed", _speed))

    def _rivals(self, job_id: str) -> Iterator[tuple[AgentState, float]]:
        """Lazily: ``share`` usually stops long before the last of 10,000 agents."""
        kind, capable, avoid = self.queues.job(job_id).kind, self.view.capable(job_id), self.avoid
        return ((b, free) for b, free in self.others if b.row.id in capable and not (avoid and avoid(b, kind)))

    def has_rival(self, job_id: str) -> bool:
        """Whether another connected agent could run the job at all."""
        return next(self._rivals(job_id), None) is not None

    def share(self, job_id: str) -> int:
        job, req = self.queues.job(job_id), self.queues.requirements(job_id)
        task = self.predictor.head(self.queues, self.agent, job_id, self.now)
        if task is None:
            return 0
        queued = self.queues.queued(job_id)
        my_end = self.now + self.predictor.predict(self.agent, job, task, req)
        ahead = 0
        predict, deadline = self.predictor.predict, job.deadline_at
        for b, free in self._rivals(job_id):
            if free >= my_end:
                continue
            runtime = predict(b, job, task, req)
            if runtime <= 0:
                continue
            n = math.ceil((my_end - free) / runtime - 1e-9) - 1
            if n <= 0:
                continue   # finishes none before this agent would: whether it fits does not matter
            # Predictor.misfit, with the runtime already known: must finish by the deadline and its window
            end, until = free + runtime, available_until(b)
            if (deadline is not None and end > deadline) or (until is not None and end > until):
                continue
            ahead += n
            if ahead >= queued:
                return 0
        return queued - ahead


class Fastest:
    name = "fastest"

    def __init__(self) -> None:
        self.predictor = Predictor()

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now = view.now()
        gate = SoonestGate(view, agent, self.predictor, now)
        picked: list[TaskRow] = []
        for job_id in candidate_jobs(view.queues, agent):
            share = gate.share(job_id)
            if share:
                picked += self.predictor.take(view.queues, agent, job_id, min(share, slots - len(picked)), now)
            if len(picked) >= slots:
                break
        return picked

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        self.predictor.attempt_settled(agent_id, job, task, ok, failure, metrics)
