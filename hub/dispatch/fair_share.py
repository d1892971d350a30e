"""``fair-share``: devices are shared between submitters in proportion to their weights.

When an agent asks, the submitter furthest below its share gets the next task: fewest devices in
use per unit of weight, then least recent use (device-seconds, decaying with a half-life, so a
burst of short tasks counts too), then the oldest job. Within a submitter: priority, then age.
Weights come from ``submitter_weights`` in hub.yaml (submitter id -> weight; missing = 1.0).
A task must still be eligible (requirements, deadline, availability window: see ``predict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hub.dispatch.predict import Predictor, candidate_jobs

if TYPE_CHECKING:
    from hub.config import HubConfig
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow

__all__ = ["FairShare", "Usage", "fair_pick", "weight"]

#: how fast past use is forgiven
HALF_LIFE_S = 3600.0

Take = Callable[[str, int], "list[TaskRow]"]


class Usage:
    """Device-seconds used per submitter, decaying with a half-life."""

    def __init__(self, half_life_s: float = HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self._values: dict[str, tuple[float, float]] = {}   # submitter -> (value, as of)

    def value(self, submitter: str, now: float) -> float:
        value, at = self._values.get(submitter, (0.0, now))
        return value * math.pow(0.5, max(now - at, 0.0) / self.half_life_s)

    def add(self, submitter: str, seconds: float, now: float) -> None:
        self._values[submitter] = (self.value(submitter, now) + max(seconds, 0.0), now)


def weight(config: HubConfig, submitter: str) -> float:
    value = config.submitter_weights.get(submitter, 1.0)
    return float(value) if isinstance(value, int | float) and value > 0 else 1.0


def fair_pick(view: DispatchView, agent: AgentState, slots: int, usage: Usage, now: float,
              take: Take, kept_capable: bool = False) -> list[TaskRow]:
    """Fill ``slots`` one task at a time, each from the submitter furthest below its share.

    ``take(job_id, limit)`` removes up to ``limit`` tasks of a job the agent may run (it applies
    the caller's eligibility rule) and returns them; a job that gives none is passed over.
    ``kept_capable``: match jobs through ``view.capable`` (for a policy that has the capable sets built anyway).
    """
    queues = view.queues
    by_submitter: dict[str, list[str]] = {}     # submitter -> candidate jobs, priority-fifo order (then reversed)
    first: dict[str, int] = {}
    for position, job_id in enumerate(candidate_jobs(queues, agent, view.capable if kept_capable else None)):
        submitter = queues.job(job_id).submitter_id
        by_submitter.setdefault(submitter, []).append(job_id)
        first.setdefault(submitter, position)
    if not by_submitter:
        return []
    for jobs in by_submitter.values():
        jobs.reverse()   # the next job last (popped when passed over)
    running: dict[str, int] = {}
    for job in queues.jobs():
        leased = queues.leased(job.id)
        if leased:
            running[job.submitter_id] = running.get(job.submitter_id, 0) + leased
    weights = {s: weight(view.config, s) for s in by_submitter}
    used = {s: usage.value(s, now) / weights[s] for s in by_submitter}   # (once: this is asked per job passed over)

    def key(submitter: str) -> tuple[float, float, int]:
        return running.get(submitter, 0) / weights[submitter], used[submitter], first[submitter]

    picked: list[TaskRow] = []
    while by_submitter and len(picked) < slots:
        submitter = min(by_submitter, key=key)
        jobs = by_submitter[submitter]
        # its jobs in turn until one gives a task: a job passed over changes no key, so it stays furthest below
        while jobs:
            got = take(jobs[-1], 1)
            if got:
                picked.extend(got)
                running[submitter] = running.get(submitter, 0) + 1
                break
            jobs.pop()
        if not jobs:
            del by_submitter[submitter]
    return picked


class FairShare:
    name = "fair-share"

    def __init__(self) -> None:
        self.predictor = Predictor()
        self.usage = Usage()
        self._now = 0.0

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now = self._now = view.now()
        return fair_pick(view, agent, slots, self.usage, now,
                         lambda job_id, limit: self.predictor.take(view.queues, agent, job_id, limit, now))

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        record_usage(self.usage, self.predictor, job, task, metrics, self._now)
        self.predictor.attempt_settled(agent_id, job, task, ok, failure, metrics)


def record_usage(usage: Usage, predictor: Predictor, job: JobRow, task: TaskRow, metrics: dict[str, Any],
                 last_now: float) -> None:
    """Charge the submitter for a settled attempt: its measured wall time, else the time it was leased."""
    now = max(task.updated_at, last_now)
    wall = metrics.get("wall_s")
    if isinstance(wall, int | float) and not isinstance(wall, bool) and wall > 0:
        seconds = float(wall)
    else:
        entry = predictor.leased.get(task.id)
        seconds = now - entry[2] if entry is not None else 0.0
    usage.add(job.submitter_id, seconds, now)
