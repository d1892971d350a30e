"""A job's results as a sweep: one row per task (unit) with its params, state, values and metrics.

Where each part of a row comes from, and why it can be believed without trusting the board:

- **params**: the submitter's own signed manifest (its signature was checked, ``verify_results``),
  expanded here with the same code the board and the agents use (``Manifest.points``): the values the
  submitter asked for at that index. The agent also signs the params and unit it ran (checked against
  that manifest before it ran, agent/daemon/assignments.py), so ``--verify`` checks that the two agree:
  a signed value is bound to the params that produced it. Only when the manifest cannot be expanded
  here (a kind this install lacks) are the agent-signed params shown instead.
- **values, metrics, agent**: the accepted (canonical, when validated by a quorum) instance's signed result.
- **state, error class**: the board's task rows (a failed attempt leaves no stored result to sign them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agent.client.submitting import ResultCheck
from jobs.committed import VIEW_MAX_TASKS, signed_manifest
from jobs.manifest import Manifest
from jobs.report import ReportSpec
from security.errors import PanalError

__all__ = ["Sweep", "check_params", "sweep_of", "sweep_rows"]

log = logging.getLogger(__name__)

#: the order in which a unit's live instances decide its shown state
_LIVE = ("leased", "validating", "queued")


class Sweep:
    """The signed manifest's view of a job: each unit's params, the swept keys, the report spec."""

    def __init__(self, points: list[dict[str, Any]] | None, swept: list[str], report: ReportSpec | None,
                 why_not: str = "", forged: bool = False) -> None:
        self.points, self.swept, self.report, self.why_not = points, swept, report, why_not
        self.forged = forged   # the board's copy of a committed job's lists is not what its submitter signed

    def params(self, unit: int) -> dict[str, Any] | None:
        if self.points is None or not 0 <= unit < len(self.points):
            return None
        return self.points[unit]


def sweep_of(reply: dict[str, Any]) -> Sweep:
    """Expand the job's signed manifest (its signature verifies: the board cannot have changed it)."""
    try:
        # a committed job's lists are checked against its signed root (jobs/committed.py)
        manifest = Manifest.from_dict(signed_manifest(reply["envelope"]), max_tasks=VIEW_MAX_TASKS)
        return Sweep(manifest.points(), [*manifest.sweep, *_shard_keys(manifest)], manifest.report)
    except PanalError as exc:
        if exc.code == "units_root_mismatch":   # a board that swapped a committed job's lists: every row says so
            return Sweep(None, [], None, exc.message, forged=True)
        log.debug("manifest not expanded here: %s", exc.message)
        return Sweep(None, [], None, exc.message)


def _shard_keys(manifest: Manifest) -> list[str]:
    return ["row_start", "row_end"] if any(r.shard_count for r in manifest.inputs.values()) else []


def check_params(checks: Sequence[ResultCheck], reply: dict[str, Any], sweep: Sweep) -> list[ResultCheck]:
    """The checks, with a problem added where an agent signed other params (or another unit) than the
    submitter's manifest gives for the task the board says the result is for."""
    out = []
    for check, row in zip(checks, reply["results"], strict=True):
        signed = check.payload.get("params")
        unit = row.get("unit")
        expected = sweep.params(int(unit)) if unit is not None else None
        problem = sweep.why_not if sweep.forged else ""
        if check.payload and signed is not None and expected is not None:
            if check.payload.get("unit") != unit:
                problem = f"the agent signed unit {check.payload.get('unit')}, the board says unit {unit}"
            elif signed != expected:
                problem = f"the agent signed params {signed} but the manifest gives {expected} for unit {unit}"
        if problem:
            check = replace(check, ok=False, problem="; ".join(filter(None, [check.problem, problem])))
        out.append(check)
    return out


def sweep_rows(reply: dict[str, Any], checks: Sequence[ResultCheck], tasks: Sequence[dict[str, Any]],
               sweep: Sweep) -> list[dict[str, Any]]:
    """One row per unit, in unit order: task_id, unit, state, params, values, metrics, agent, verified,
    error_class, error."""
    job_id = reply["job"]["id"]
    canonical = {int(u["unit"]): u.get("canonical_task") for u in (reply.get("validation") or {}).get("units") or []
                 if u.get("state") == "validated"}
    results: dict[int, list[tuple[dict[str, Any], ResultCheck]]] = {}
    for row, check in zip(reply["results"], checks, strict=True):
        unit = row.get("unit")
        unit = int(unit) if unit is not None else int(str(row["task_id"]).rsplit(".", 1)[1])
        results.setdefault(unit, []).append((row, check))
    instances: dict[int, list[dict[str, Any]]] = {}
    for task in tasks:
        instances.setdefault(int(task.get("unit", task["idx"])), []).append(task)
    units = sorted(set(results) | set(instances) | set(range(len(sweep.points or []))))
    return [_row(job_id, unit, results.get(unit, []), instances.get(unit, []), canonical.get(unit), sweep)
            for unit in units]


def _row(job_id: str, unit: int, results: list[tuple[dict[str, Any], ResultCheck]], tasks: list[dict[str, Any]],
         canonical: str | None, sweep: Sweep) -> dict[str, Any]:
    accepted = [(r, c) for r, c in results if r.get("state") in (None, "done")]
    accepted.sort(key=lambda rc: rc[0]["task_id"] != canonical)   # the validated canonical instance first
    row: dict[str, Any] = {"task_id": f"{job_id}.{unit}", "unit": unit}
    if accepted:
        _, check = accepted[0]
        params = sweep.params(unit)
        row.update(state="done", params=params if params is not None else check.payload.get("params") or {},
                   values=check.payload.get("values") or {}, metrics=check.payload.get("metrics") or {},
                   agent=check.agent, verified=check.ok, error_class=None,
                   error=check.problem or None)
        return row
    states = [t.get("state") for t in tasks]
    failed = next((t for t in tasks if t.get("state") == "failed"), None)
    state = next((s for s in _LIVE if s in states), None) or ("failed" if failed else
                                                             states[0] if states else "unknown")
    shown = failed if state == "failed" else next((t for t in tasks if t.get("state") == state), None)
    row.update(state=state, params=sweep.params(unit) or {}, values={}, metrics={},
               agent=(shown or {}).get("agent"), verified=None,
               error_class=(shown or {}).get("error_class"), error=(shown or {}).get("error"))
    return row
