"""Capability classes: agents grouped by what matters to matching, so work can be offered per group.

Ten thousand agents are a few hundred kinds of machine. A class is a hashable summary of a capability
report: every field kept *exactly*, except the high-cardinality ones that ``unmet`` never reads (names,
indexes, bandwidths, availability windows) and the numeric thresholds it compares with ``>=`` (memory,
VRAM, GFLOPS, the volunteer's memory ceiling), which are rounded *up* to a geometric bucket. The class's
representative report therefore meets every requirement some member meets (``unmet`` on it is
optimistic, never pessimistic): asking it "could someone of this class run the job?" can wake an agent
that then finds it cannot, never leave asleep one that can.

Extending matching (a new ``requires`` clause that reads a new capability field) needs nothing here: an
unknown field is kept exactly. A new field compared with ``>=`` may join :data:`_ROUNDED_UP` (fewer
classes); a new high-cardinality field that matching ignores may join :data:`_DROPPED`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.requirements import Capabilities, Requirements, unmet

__all__ = ["CapClass", "capability_class"]

#: one bucket spans this factor (6 and 7 GB share one, 8 GB starts the next)
BUCKET = 1.25
#: fields matching does not read; per section of the report
_DROPPED: dict[str, frozenset[str]] = {
    "": frozenset({"available_until", "slots", "gpu_errors", "name", "python", "threads"}),
    "cpu": frozenset({"model", "threads", "cores", "memory_bandwidth_gbps"}),
    "gpu": frozenset({"name", "index", "vendor", "memory_bandwidth_gbps", "gflops_fp16"}),
}
#: numeric fields that matching compares as ``have >= need`` (rounding them up is optimistic)
_ROUNDED_UP: dict[str, frozenset[str]] = {
    "": frozenset({"memory_gb", "max_memory_gb"}),
    "cpu": frozenset({"gflops_fp32"}),
    "gpu": frozenset({"vram_gb", "gflops_fp32"}),
}


def _up(value: Any) -> Any:
    """The top of ``value``'s geometric bucket (0 and negative values and non-numbers stay as they are)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or math.isinf(value):
        return value
    try:
        return BUCKET ** math.ceil(math.log(value, BUCKET) - 1e-9)
    except OverflowError:   # within a bucket of the float limit (1.7e308 GB): the top is past it
        return math.inf


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    dropped, rounded = _DROPPED[name], _ROUNDED_UP[name]
    return {k: (_up(v) if k in rounded else v) for k, v in raw.items() if k not in dropped}


def _normalised(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = _section(raw, "")
    if isinstance(raw.get("cpu"), Mapping):
        out["cpu"] = _section(raw["cpu"], "cpu")
    gpus = raw.get("gpus")
    if isinstance(gpus, list | tuple):
        sections = [_section(g, "gpu") for g in gpus if isinstance(g, Mapping)]
        out["gpus"] = sorted(sections, key=lambda g: json.dumps(g, sort_keys=True, default=str))
    if isinstance(raw.get("kinds"), list | tuple):
        out["kinds"] = sorted(str(k) for k in raw["kinds"])
    return out


@dataclass(frozen=True, eq=False)
class CapClass:
    """A capability class: its key (equal for every member) and a representative report.

    The key is a digest of the normalised report, not the report: it is held per job in the wake index's
    cache, and a report (unknown fields kept exactly) may be 64 KB (jobs/protocol_registration.py)."""

    key: str
    representative: Capabilities

    def may_run(self, req: Requirements, kind: str) -> bool:
        """Whether some member may meet ``req`` (never False when one does)."""
        return not unmet(req, kind, self.representative)


def capability_class(caps: Capabilities) -> CapClass:
    """The class of an agent's capability report (see the module docstring for what it keeps)."""
    normal = _normalised(caps.raw)
    try:
        key = json.dumps(normal, sort_keys=True, default=str)
    except (TypeError, ValueError):   # a report json cannot order (mixed key types): a class of its own
        key = repr(sorted(normal.items(), key=lambda kv: str(kv[0])))
    key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    try:
        representative = Capabilities.from_dict(normal)
    except (TypeError, ValueError, AttributeError, OverflowError):   # malformed: what the board parsed stands
        representative = caps
    return CapClass(key, representative)
