"""What a job manifest may say: the published JSON Schema, its absolute bounds, durations, and the words for
a violation.

Split from :mod:`jobs.manifest` (the typed ``Manifest`` and the checks beyond structure): the schema is data
that ``panal schema`` prints, the compiled validator checks and editors read, while the dataclass and the
sweep's expansion are code. The bounds live here because the schema states them; ``validate`` reuses them
for what JSON Schema cannot say (NaN, a duration's length).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from jobs.catalog import all_kinds
from jobs.code_spec import CODE_SCHEMA
from jobs.inputs import INPUT_SCHEMA
from jobs.report import REPORT_SCHEMA
from security.errors import BadRequest

__all__ = ["BASE_SCHEMA", "MAX_MEMORY_GB", "MAX_THREADS", "MAX_TIMEOUT_S", "expected", "manifest_schema",
           "parse_duration", "unknown"]

#: Absolute bounds of ``spec.resources`` (a hub may set lower ones, hub.yaml): no machine a volunteer runs
#: has 4 TiB of RAM, and no single task should hold a lease for more than 30 days (checkpoint and split it).
MAX_MEMORY_GB = 4096.0
MAX_TIMEOUT_S = 30 * 86400.0
MAX_THREADS = 1024   # ``spec.resources.threads``: more than any volunteer's machine has cores
#: the unit's trailing blanks belong to it: ``\s*(unit)?\s*$`` split a run of blanks between two ``\s*`` every way
#: before failing (quadratic: "1", 16k spaces and "x" took 0.9 s, a 4 MiB body hours of the hub's event loop)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:(ms|s|m|h|d)\s*)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DURATION_SCHEMA = {"type": ["number", "string"], "pattern": _DURATION.pattern, "minimum": 0}

BASE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "panal job manifest",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "panal/v1"},
        "kind": {"const": "Job"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 64},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["task"],
            "properties": {
                "task": {"type": "string", "description": "a catalog kind"},
                "params": {"type": "object"},
                "inputs": INPUT_SCHEMA,
                "report": REPORT_SCHEMA,   # jobs/report.py: which metric ranks the tasks (the best task)
                "code": CODE_SCHEMA,
                "sweep": {
                    "type": "object",
                    "description": "cartesian product of values: one task per point",
                    "additionalProperties": {"type": "array", "minItems": 1, "maxItems": 100_000},
                },
                "requires": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "device": {"enum": ["any", "cpu", "gpu"]},
                        "backends": {"type": "array", "items": {"enum": ["cpu", "cuda", "rocm", "mps"]}},
                        "min_vram_gb": {"type": "number", "minimum": 0},
                        "min_compute_capability": {"type": "string", "pattern": r"^\d+\.\d+$"},
                        "min_memory_gb": {"type": "number", "minimum": 0},
                        "min_gflops": {"type": "number", "minimum": 0},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "torch": {"type": "string", "description": "a version range, e.g. \">=2.1,<3\""},
                    },
                },
                "resources": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "timeout": _DURATION_SCHEMA,
                        "max_memory_gb": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_MEMORY_GB},
                        "threads": {"type": "integer", "minimum": 1, "maximum": MAX_THREADS},
                    },
                },
                "policy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "priority": {"type": "integer", "minimum": -100, "maximum": 100},
                        "retries": {"type": "integer", "minimum": 0, "maximum": 100},
                        "deadline": _DURATION_SCHEMA,
                        "replicas": {"type": "integer", "minimum": 1, "maximum": 16,
                                     "description": "shorthand for validation: {quorum: N, adaptive: false}"},
                        "validation": {
                            "type": "object",
                            "additionalProperties": False,
                            "description": "instances of each task that must agree (hub/trust/)",
                            "properties": {
                                "quorum": {"type": "integer", "minimum": 1, "maximum": 16},
                                "max_instances": {"type": "integer", "minimum": 1, "maximum": 32},
                                "adaptive": {"type": "boolean"},
                                "compare": {"enum": ["auto", "exact", "tolerant", "none"]},
                                "tolerance": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                            },
                        },
                    },
                },
            },
        },
    },
}


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest, with each kind's parameters (what `panal schema` prints)."""
    schema = json.loads(json.dumps(BASE_SCHEMA))
    spec = schema["properties"]["spec"]
    spec["properties"]["task"]["enum"] = sorted(all_kinds())
    spec["allOf"] = [
        {"if": {"properties": {"task": {"const": name}}},
         "then": {"properties": {"params": kind.schema()}}}
        for name, kind in sorted(all_kinds().items())
    ]
    return dict(schema)


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"10m"``, ``"6h"``, ``"1d"`` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise BadRequest(f"not a duration (expected e.g. 90s, 10m, 6h): {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def expected(error: jsonschema.ValidationError) -> str:
    v, got = error.validator, json.dumps(error.instance, default=str)[:80]
    value: Any = error.validator_value
    instance: Any = error.instance
    schema: Any = error.schema
    names = {"number": "a number", "integer": "an integer", "string": "a string", "object": "a map",
             "array": "a list", "boolean": "true or false"}
    if v == "type":
        types = value if isinstance(value, list) else [value]
        return f"expected {' or '.join(names.get(t, str(t)) for t in types)}, got {got}"
    if v == "minimum":
        return f"expected a number >= {value}, got {got}"
    if v == "exclusiveMinimum":
        return f"expected a number > {value}, got {got}"
    if v == "maximum":
        return f"expected a number <= {value}, got {got}"
    if v == "enum":
        return f"expected one of {', '.join(map(str, value))}, got {got}"
    if v == "const":
        return f"expected {json.dumps(value)}, got {got}"
    if v == "pattern":
        return f"unexpected format {got}"
    if v == "required":
        missing = [k for k in value if k not in instance]
        return f"missing required field {', '.join(missing)}"
    if v == "additionalProperties":
        extra = [k for k in instance if k not in schema.get("properties", {})]
        return f"unknown field {', '.join(map(repr, extra))}"
    if v in ("minItems", "maxItems", "maxProperties"):
        return str(error.message)
    return str(error.message)


def unknown(path: str, key: str, schema: Mapping[str, Any]) -> str:
    known = ", ".join(sorted(schema.get("properties", {})))
    return f"unknown field {key!r}" + (f" (expected one of: {known})" if known else "")
