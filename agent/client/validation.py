"""What a submitter sees of result validation (hub/trust/): per task (unit), validated by k agents of
quorum q, pending, or no_consensus with the disagreeing values; and an offline check of the board's
validation records against the agents' signed results (``panal results --verify``).

The check needs no trust in the board: every agent the board names as agreeing must have a signed,
verified result for an instance of that unit, no agent (and no owner) counts twice, at least
``quorum`` of them must agree with the canonical values under the job's comparator (jobs/compare.py),
and the canonical values must be the ones the canonical agent signed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.client.submitting import ResultCheck
from jobs.compare import CompareSpec, disagreement

__all__ = ["check_validation", "unit_rows"]


def unit_rows(reply: dict[str, Any], checks: Sequence[ResultCheck]) -> list[dict[str, Any]]:
    """One row per unit: task_id, state, quorum, agents that agreed, canonical {agent_id, values}, invalid."""
    job_id = reply["job"]["id"]
    validation = reply.get("validation") or {}
    records = {int(u["unit"]): u for u in validation.get("units") or []}
    by_unit: dict[int, list[tuple[dict[str, Any], ResultCheck]]] = {}
    for result, check in zip(reply["results"], checks, strict=True):
        unit = result.get("unit")
        if unit is None:
            unit = int(str(result["task_id"]).rsplit(".", 1)[1])
        by_unit.setdefault(int(unit), []).append((result, check))
    out = []
    for unit in sorted(set(by_unit) | set(records)):
        record = records.get(unit)
        results = by_unit.get(unit, [])
        row: dict[str, Any] = {"task_id": f"{job_id}.{unit}", "instances": [r["task_id"] for r, _ in results]}
        if record is None:   # no validation on this job (quorum 1): each result stands alone
            accepted = [(r, c) for r, c in results if r.get("state") in (None, "done")]
            row.update(state="validated" if accepted else "pending", quorum=1,
                       agents=[c.agent for _, c in accepted[:1]],
                       canonical={"agent_id": accepted[0][1].agent, "values": accepted[0][1].payload.get("values")}
                       if accepted else None, invalid=[])
        elif record["state"] == "validated":
            canonical = next((c for r, c in results if r["task_id"] == record.get("canonical_task")), None)
            row.update(state="validated", quorum=record["quorum"], agents=list(record["agents"]),
                       canonical={"agent_id": canonical.agent if canonical else record["agents"][0],
                                  "values": (record.get("detail") or {}).get("values")},
                       invalid=[{"agent_id": c.agent, "task_id": r["task_id"], "values": c.payload.get("values")}
                                for r, c in results if r.get("state") == "invalid"])
        elif record["state"] == "no_consensus":
            row.update(state="no_consensus", quorum=record["quorum"], agents=[], canonical=None,
                       answers=[{"agent_id": a.get("agent"), "values": a.get("values")}
                                for a in (record.get("detail") or {}).get("answers", [])],
                       invalid=[])
        else:
            row.update(state="pending", quorum=record.get("quorum", 1), agents=[], canonical=None, invalid=[])
        out.append(row)
    return out


def check_validation(reply: dict[str, Any], checks: Sequence[ResultCheck]) -> list[str]:
    """Problems with the board's validation records, checked against the signed results (empty: none)."""
    validation = reply.get("validation") or {}
    compare = CompareSpec.from_dict((validation.get("policy") or {}).get("compare") or {"mode": "exact"})
    by_task = {c.task_id: c for c in checks}
    units: dict[int, list[ResultCheck]] = {}
    for row in reply["results"]:
        if row.get("unit") is not None:
            units.setdefault(int(row["unit"]), []).append(by_task[row["task_id"]])
    problems = []
    for record in validation.get("units") or []:
        if record["state"] != "validated":
            continue
        unit = int(record["unit"])
        signed = {c.agent: c for c in units.get(unit, []) if c.ok}
        canonical = by_task.get(record.get("canonical_task") or "")
        values = (record.get("detail") or {}).get("values")
        if canonical is None or not canonical.ok or canonical.payload.get("values") != values:
            problems.append(f"unit {unit}: the canonical values are not what its agent signed")
            continue
        agents = list(record["agents"])
        if len(set(agents)) != len(agents) or len(agents) < int(record["quorum"]):
            problems.append(f"unit {unit}: {len(set(agents))} distinct agents agree, quorum {record['quorum']}")
        for agent in agents:
            check = signed.get(agent)
            if check is None:
                problems.append(f"unit {unit}: agent {agent} has no verified result for it")
            elif (why := disagreement(compare, values or {}, check.payload.get("values") or {})) is not None:
                problems.append(f"unit {unit}: agent {agent} is counted as agreeing but {why}")
    return problems
