"""Reading a sweep: the manifest's ``spec.report`` (which metric ranks a job's tasks, and which way) and
how a name such as ``val_acc`` or ``params.lr`` finds its value in one task's params and result.

The board ranks a job's accepted results by the report metric as they arrive (``hub/best.py``); the
submitter's ``panal results --sort/--filter`` resolves names with the same :func:`lookup`, so the board's
"best task" and the CLI's first row agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["NAME_PATTERN", "REPORT_SCHEMA", "SECTIONS", "ReportSpec", "better", "lookup", "metric_value"]

#: where a name is looked for when it names no section, in this order: what the task computed first
#: (``values``), then how it ran (``metrics``: wall_s, gflops, ...), then what it was given (``params``)
SECTIONS = ("values", "metrics", "params")
#: a name: an identifier, optionally a section first and dotted keys into nested maps (``values.eval.acc``)
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,7}$"

REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["metric", "mode"],
    "description": "how to rank the job's tasks: the value a task returns (or a metric of its run), "
                   "and whether more (max) or less (min) is better",
    "properties": {
        "metric": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 120},
        "mode": {"enum": ["max", "min"]},
    },
}

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class ReportSpec:
    """``spec.report``: the task with the best ``metric`` (by ``mode``) is the job's best task."""

    metric: str
    mode: Mode

    @classmethod
    def from_dict(cls, source: Mapping[str, Any] | None) -> ReportSpec | None:
        """The validated ``spec.report`` map (REPORT_SCHEMA), or None when the manifest names none."""
        if not source:
            return None
        return cls(str(source["metric"]), "min" if source.get("mode") == "min" else "max")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode}


def lookup(sections: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """(found, value) of ``name`` in a row's ``sections`` (maps named as in :data:`SECTIONS`, plus
    top-level fields such as ``state``). ``params.lr`` reads one section; a bare ``lr`` is a top-level
    field, else the first section that has it; dots walk into nested maps."""
    head, _, rest = name.partition(".")
    if head in SECTIONS and rest:
        return _walk(sections.get(head), rest)
    if name in sections and name not in SECTIONS:
        return True, sections[name]
    for section in SECTIONS:
        found, value = _walk(sections.get(section), name)
        if found:
            return True, value
    return False, None


def _walk(value: Any, path: str) -> tuple[bool, Any]:
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return False, None
        value = value[key]
    return True, value


def metric_value(payload: Mapping[str, Any], metric: str) -> float | None:
    """The report metric of a signed result payload (its ``values``, else its ``metrics``) as a finite
    number; None when it is missing, not a number, or NaN/infinite (such a task cannot be ranked)."""
    values, metrics = payload.get("values"), payload.get("metrics")
    found, value = lookup({"values": values if isinstance(values, Mapping) else {},
                           "metrics": metrics if isinstance(metrics, Mapping) else {}}, metric)
    if not found or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def better(candidate: float, incumbent: float | None, mode: Mode) -> bool:
    """Whether ``candidate`` beats ``incumbent`` (a tie does not: the first task to reach a value keeps it)."""
    if incumbent is None:
        return True
    return candidate > incumbent if mode == "max" else candidate < incumbent
