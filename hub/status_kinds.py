"""Per job kind, for the status page: backlog, tasks in progress, recent run times and failure rate.

Run times and failures are kept incrementally as attempts settle (never a scan of tasks per request): per
kind a window of the last ``WINDOW`` attempts, with their run times kept sorted (an insertion and a
removal per attempt, O(WINDOW) at worst), so the median and p90 are a lookup. A run time is the agent's
``wall_s`` metric, clamped to [0, the job's timeout]: an agent may shade its own figures within that, and
one agent's attempts are at most a window's worth of the figure. Backlog and in-progress counts come from
the queue index once per snapshot (a pass over the active jobs, not their tasks).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hub.records import JobRow, TaskState

__all__ = ["WINDOW", "KindStats"]

WINDOW = 500            # recent attempts per kind behind the run-time percentiles and failure rate
MAX_KINDS = 64          # kinds tracked (the catalog has far fewer; a bound against anything odd)


@dataclass
class _Recent:
    runs: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))   # ok run times, arrival order
    ordered: list[float] = field(default_factory=list)                          # the same, sorted
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))  # True: failed
    failures: int = 0                                                           # True values in outcomes
    done: int = 0
    failed: int = 0

    def add(self, ok: bool, run_s: float | None) -> None:
        if len(self.outcomes) == WINDOW:
            self.failures -= self.outcomes[0]
        self.outcomes.append(not ok)
        self.failures += not ok
        self.done += ok
        self.failed += not ok
        if ok and run_s is not None:
            if len(self.runs) == WINDOW:
                old = self.runs[0]
                del self.ordered[bisect.bisect_left(self.ordered, old)]
            self.runs.append(run_s)
            bisect.insort(self.ordered, run_s)

    def quantile(self, q: float) -> float | None:
        if not self.ordered:
            return None
        return self.ordered[min(len(self.ordered) - 1, int(q * len(self.ordered)))]


class KindStats:
    """Recent attempts per kind (fed by the status feed's ``attempt_settled``)."""

    def __init__(self) -> None:
        self.kinds: dict[str, _Recent] = {}

    def settled(self, job: JobRow, ok: bool, metrics: Mapping[str, Any]) -> None:
        recent = self.kinds.get(job.kind)
        if recent is None:
            if len(self.kinds) >= MAX_KINDS:
                return
            recent = self.kinds[job.kind] = _Recent()
        wall = metrics.get("wall_s")
        run_s = None
        if isinstance(wall, int | float) and not isinstance(wall, bool) and wall == wall:
            run_s = float(min(max(wall, 0.0), job.timeout_s))
        recent.add(ok, run_s)

    def table(self, active: Iterable[tuple[JobRow, Mapping[TaskState, int]]],
              why: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """One row per kind with active jobs or recent attempts, largest backlog first."""
        rows: dict[str, dict[str, Any]] = {}

        def row(kind: str) -> dict[str, Any]:
            found = rows.get(kind)
            if found is None:
                found = rows[kind] = {"kind": kind, "jobs": 0, "queued": 0, "running": 0}
            return found

        for job, counts in active:
            r = row(job.kind)
            r["jobs"] += 1
            r["queued"] += counts.get(TaskState.QUEUED, 0)
            r["running"] += counts.get(TaskState.LEASED, 0)
        for kind in self.kinds:
            row(kind)
        for kind, r in rows.items():
            recent = self.kinds.get(kind)
            n = len(recent.outcomes) if recent else 0
            median, p90 = (recent.quantile(0.5), recent.quantile(0.9)) if recent else (None, None)
            r.update({"run_s_median": median, "run_s_p90": p90, "recent_attempts": n,
                      "failure_rate": round(recent.failures / n, 4) if recent and n else None,
                      "done": recent.done if recent else 0, "failed": recent.failed if recent else 0,
                      "waiting_because": why.get(kind, [])})
        return sorted(rows.values(), key=lambda r: (-r["queued"], -r["running"], r["kind"]))
