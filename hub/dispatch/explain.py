"""Why a queued job has no taker: requirement clauses, then deadline and availability windows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.dispatch.predict import Predictor
from hub.fleet import available_until
from jobs.requirements import explain, unmet

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import DispatchView

__all__ = ["explain_waiting", "human_duration"]


def human_duration(seconds: float) -> str:
    """``45s``, ``12m``, ``2h``, ``2.5h``, ``3d``."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + "h"
    return f"{seconds / 86400:.1f}".removesuffix(".0") + "d"


def explain_waiting(view: DispatchView, job_id: str, predictor: Predictor | None = None) -> list[str]:
    """One line per reason no connected agent can take the job's next queued task; empty if one can.

    ``predictor``: the active policy's, when it has one (what it learned of each agent's speed).
    """
    queues = view.queues
    if not queues.queued(job_id):
        return []
    job = queues.job(job_id)
    now = view.now()
    fleet = view.connected()
    req = queues.requirements(job_id)
    lines = explain(req, job.kind, [a.caps for a in fleet])
    capable = [a for a in fleet if not unmet(req, job.kind, a.caps)]
    task = next(iter(queues.peek(job_id, 1)), None)
    if not capable or task is None:
        return lines
    predictor = predictor or Predictor()
    runtimes = sorted((predictor.predict(a, job, task, req), i) for i, a in enumerate(capable))
    if any(predictor.misfit(a, job, task, req, now) is None for a in capable):
        return lines
    n = len(capable)
    fastest = runtimes[0][0]
    if job.deadline_at is not None:
        left = job.deadline_at - now
        in_time = [(r, capable[i]) for r, i in runtimes if now + r <= job.deadline_at]
        if left <= 0:
            lines.append(f"its deadline passed {human_duration(-left)} ago: no agent can finish it in time")
            return lines
        if not in_time:
            lines.append(f"needs to finish within {human_duration(left)}: the fastest of {n} capable connected "
                         f"agents would take ~{human_duration(fastest)}")
            return lines
        runtime = in_time[0][0]
        lines.append(f"needs to finish within {human_duration(left)}: the {len(in_time)} of {n} capable connected "
                     f"agents fast enough (~{human_duration(runtime)} on the fastest) leave before it would be done"
                     f"{_longest(in_time, now)}")
        return lines
    lines.append(f"needs ~{human_duration(fastest)} on the fastest capable agent: all {n} capable connected "
                 f"agents leave sooner{_longest([(r, capable[i]) for r, i in runtimes], now)}")
    return lines


def _longest(agents: list[tuple[float, AgentState]], now: float) -> str:
    windows = [until - now for _, a in agents if (until := available_until(a)) is not None]
    return f" (longest window left: {human_duration(max(windows))})" if windows else ""
