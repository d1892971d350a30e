"""A job's best task by the metric its manifest names (``spec.report``), kept as results are accepted.

Incremental, so a status request never scans results: each accepted result is compared once with the
job's best so far (:meth:`BestTasks.offer`, called by the settlement when the validator accepts it), and a
new best is written with the job row in the same commit as the result that made it (the board asks
:meth:`BestTasks.changed` when it persists). So the best survives a restart with the job row, finished
jobs included, and is never ahead of the results the store holds.

Only accepted results count: a result held for its unit's other instances, outvoted or rejected never
becomes the best. The value is the agent's signed one; with a quorum, the instances agreed on it.
"""

from __future__ import annotations

from hub.records import JobRow, TaskRow
from jobs.report import ReportSpec, better, metric_value

__all__ = ["BestTasks"]


class BestTasks:
    """Updates ``JobRow.best`` from accepted results; remembers which jobs' rows must be written."""

    def __init__(self) -> None:
        self._changed: set[str] = set()

    def offer(self, job: JobRow, task: TaskRow, payload: dict[str, object]) -> bool:
        """Consider an accepted result of ``task``; True if it is the job's new best."""
        spec = ReportSpec.from_dict(job.report)
        if spec is None:
            return False
        value = metric_value(payload, spec.metric)
        incumbent = job.best.get("value") if job.best else None
        if value is None or not better(value, incumbent if isinstance(incumbent, int | float) else None, spec.mode):
            return False
        job.best = {"task_id": f"{job.id}.{task.unit_idx}", "unit": task.unit_idx, "instance": task.id,
                    "metric": spec.metric, "mode": spec.mode, "value": value, "agent": task.agent_id,
                    "params": task.params}
        self._changed.add(job.id)
        return True

    def changed(self, job_id: str) -> bool:
        """Whether the job's best changed since its row was last written (and forget it: it is written now)."""
        if job_id in self._changed:
            self._changed.discard(job_id)
            return True
        return False
