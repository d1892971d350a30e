"""``priority-fifo``: highest priority first, then the oldest job; the simplest fair-enough rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobs.requirements import unmet

if TYPE_CHECKING:
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow


class PriorityFifo:
    name = "priority-fifo"
    predictor: Predictor | None = None   # no runtime prediction

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        queues = view.queues
        picked: list[TaskRow] = []
        for job_id in queues.waiting():
            if unmet(queues.requirements(job_id), queues.job(job_id).kind, agent.caps):
                continue
            picked += queues.take_first(job_id, slots - len(picked))
            if len(picked) >= slots:
                break
        return picked

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        """Nothing to learn: the order does not depend on how attempts went."""
