"""Job manifests: YAML -> validated, typed :class:`Manifest` -> expanded task parameters.

Validation is strict (unknown keys are errors) and reports every problem at once, each as
``file:line:col: field.path: expected ..., got ...``. The same checks run in the CLI (with
positions) and on the board (on the signed manifest, with field paths only). The schema itself, its bounds
and durations are in :mod:`jobs.manifest_schema` (re-exported here: ``manifest_schema``, ``parse_duration``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.catalog import get_kind
from jobs.code_spec import with_code
from jobs.errors import InvalidParams
from jobs.inputs import InputRef, check_inputs, parse_inputs, shard_points
from jobs.manifest_schema import (
    BASE_SCHEMA,
    MAX_MEMORY_GB,
    MAX_TIMEOUT_S,
    expected,
    manifest_schema,
    parse_duration,
    unknown,
)
from jobs.report import ReportSpec
from jobs.requirements import Requirements, torch_range_problem
from jobs.schema_check import SchemaCheck
from jobs.yamlpos import path_text
from security.errors import BadRequest

__all__ = ["DEFAULT_MAX_TASKS", "DEFAULT_MEMORY_GB", "MAX_MEMORY_GB", "MAX_TIMEOUT_S", "Manifest", "ManifestError",
           "manifest_schema", "parse_duration", "validate"]

DEFAULT_MAX_TASKS = 10_000
#: The memory cap of a task whose manifest names none: half of an 8 GB laptop, a quarter of a 16 GB
#: desktop, so an undeclared task cannot take a volunteer's machine down (a matmul 32768 fp64 would grow
#: to ~17 GB), yet enough for the kinds' default parameters. A task that needs more says so.
DEFAULT_MEMORY_GB = 4.0


@dataclass(frozen=True)
class Manifest:
    """A validated job manifest. ``source`` is the plain dict that the submitter signs."""

    name: str
    kind: str
    params: dict[str, Any]
    sweep: dict[str, list[Any]]
    requires: Requirements
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0
    max_memory_gb: float | None = None
    threads: int | None = None   # CPU threads a task asks for; the agent bounds it by what its volunteer lends
    priority: int = 0
    retries: int = 3
    deadline_s: float | None = None
    replicas: int = 1
    #: ``policy.validation`` as written (hub/trust/policy.py resolves it with the kind's and board's defaults)
    validation: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, InputRef] = field(default_factory=dict)
    report: ReportSpec | None = None
    source: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None   # where relative input paths are (the manifest file's folder)

    @property
    def memory_cap_gb(self) -> float:
        """The memory a task of this job may use: its ``max_memory_gb``, else :data:`DEFAULT_MEMORY_GB`."""
        return float(self.max_memory_gb) if self.max_memory_gb else DEFAULT_MEMORY_GB

    @property
    def n_tasks(self) -> int:
        points = 1
        for values in self.sweep.values():
            points *= len(values)
        shards = max((r.shard_count or 1 for r in self.inputs.values()), default=1)
        return points * shards * self.replicas

    @property
    def n_units(self) -> int:
        """Distinct tasks (sweep points x shards); a board runs each as one or more instances."""
        return self.n_tasks // self.replicas

    def points(self) -> list[dict[str, Any]]:
        """Parameters of each unit, in a stable order (sweep points x shards). Replicas are not repeated
        here: a board runs them as instances of the unit (hub/trust/), and an assignment names its unit."""
        kind = get_kind(self.kind)
        keys = list(self.sweep)
        out = []
        shards = shard_points(self.inputs)
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            for shard in shards:
                params = kind.validate({**self.params, **dict(zip(keys, combo, strict=True)), **shard})
                out.append(params)
        return out

    def point(self, unit: int, shards: list[dict[str, int]] | None = None) -> dict[str, Any]:
        """The parameters of one unit: ``points()[unit]``, without expanding the others. An agent checks every
        assignment against its submitter's manifest, and a 100k-task sweep expanded per job would cost it
        100k dicts; ``shards`` is :func:`~jobs.inputs.shard_points` of the inputs, if the caller keeps it."""
        shards = shard_points(self.inputs) if shards is None else shards
        keys = list(self.sweep)
        units = len(shards)
        for key in keys:
            units *= len(self.sweep[key])
        if not 0 <= unit < units:
            raise IndexError(f"unit {unit} is outside this manifest's {units} units")
        rest, shard = divmod(unit, len(shards))
        combo: list[Any] = []
        for key in reversed(keys):   # itertools.product's order: the last key varies fastest
            rest, at = divmod(rest, len(self.sweep[key]))
            combo.append(self.sweep[key][at])
        combo.reverse()
        return get_kind(self.kind).validate({**self.params, **dict(zip(keys, combo, strict=True)), **shards[shard]})

    @classmethod
    def from_dict(cls, source: Any, max_tasks: int = DEFAULT_MAX_TASKS, expand: bool = True) -> Manifest:
        """Validate a manifest dict; raise :class:`ManifestError` listing every problem (``expand``:
        :func:`validate`'s)."""
        errors = validate(source, max_tasks, expand)
        if errors:
            raise ManifestError([(None, path, msg) for path, msg in errors])
        return cls._build(source)

    @classmethod
    def _build(cls, source: dict[str, Any]) -> Manifest:
        spec = source["spec"]
        kind = get_kind(spec["task"])
        resources, policy = spec.get("resources", {}), spec.get("policy", {})
        return cls(
            name=source["metadata"]["name"],
            labels=dict(source["metadata"].get("labels", {})),
            kind=kind.name,
            params=kind.validate(spec.get("params", {})),
            sweep={k: list(v) for k, v in spec.get("sweep", {}).items()},
            requires=Requirements.from_dict(spec.get("requires", {})),
            timeout_s=parse_duration(resources.get("timeout", 3600)),
            max_memory_gb=resources.get("max_memory_gb"),
            threads=int(resources["threads"]) if "threads" in resources else None,   # 2.0 is an integer in JSON Schema
            priority=int(policy.get("priority", 0)),
            retries=int(policy.get("retries", 3)),
            deadline_s=parse_duration(policy["deadline"]) if "deadline" in policy else None,
            replicas=int(policy.get("replicas", 1)),
            validation=dict(policy.get("validation", {})),
            inputs=parse_inputs(spec.get("inputs", {})),
            report=ReportSpec.from_dict(spec.get("report")),
            source=source,
        )


class ManifestError(BadRequest):
    """Every problem of a manifest: (position or None, field path, message) triples."""

    code = "invalid_manifest"

    def __init__(self, problems: list[tuple[tuple[str, int, int] | None, str, str]]) -> None:
        self.problems = problems
        lines = []
        for where, path, msg in problems:
            prefix = f"{where[0]}:{where[1]}:{where[2]}: " if where else ""
            lines.append(f"{prefix}{path + ': ' if path else ''}{msg}")
        super().__init__("\n".join(lines), details=[{"path": p, "message": m} for _, p, m in problems])


_VALIDATOR = SchemaCheck(BASE_SCHEMA)   # compiled first, jsonschema's messages (jobs/schema_check.py)


def validate(source: Any, max_tasks: int = DEFAULT_MAX_TASKS, expand: bool = True) -> list[tuple[str, str]]:
    """All problems of a manifest dict as (field path, message), empty if it is valid. ``expand``: also check that
    every unit validates (each expanded); an agent, which checks the one unit it runs, passes False."""
    if not isinstance(source, dict):
        return [("", f"a manifest must be a map, got {json.dumps(source, default=str)[:60]}")]
    errors: list[tuple[str, str]] = []
    for error in sorted(_VALIDATOR.errors(source), key=lambda e: list(map(str, e.absolute_path))):
        path = ""
        for part in error.absolute_path:
            path = path_text(path, part)
        if error.validator == "additionalProperties":
            for key in error.instance:
                if key not in error.schema.get("properties", {}):
                    errors.append((path_text(path, key), unknown(path, key, error.schema)))
            continue
        errors.append((path, expected(error)))
    errors.extend(p for p in _non_finite(source) if p[0] not in {path for path, _ in errors})
    structural = bool(errors)
    # Keep going where the structure allows, so every problem is reported at once.
    spec = source.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        return errors
    try:
        kind = get_kind(spec["task"])
    except BadRequest as exc:
        return [*errors, ("spec.task", exc.message)]
    base: dict[str, Any] = {}
    if isinstance(spec.get("params", {}), dict):
        try:
            base = kind.validate(spec.get("params", {}))
        except InvalidParams as exc:
            errors.extend(exc.errors)
    if structural:
        return sorted(errors)
    for key, values in spec.get("sweep", {}).items():
        if key not in kind.params:
            errors.append((f"spec.sweep.{key}", f"unknown parameter for kind {kind.name}"))
            continue
        for i, value in enumerate(values):
            problem = kind.params[key].check(key, value)
            if problem:
                errors.append((f"spec.sweep.{key}[{i}]", problem))
    check_inputs(kind, with_code(spec, kind, parse_inputs(spec.get("inputs", {})), errors), errors)
    if "torch" in spec.get("requires", {}) and (problem := torch_range_problem(spec["requires"]["torch"])):
        errors.append(("spec.requires.torch", problem))
    for key in ("timeout",):
        if key in spec.get("resources", {}):
            _check_duration(spec["resources"][key], f"spec.resources.{key}", errors, MAX_TIMEOUT_S)
    if "deadline" in spec.get("policy", {}):
        _check_duration(spec["policy"]["deadline"], "spec.policy.deadline", errors)
    validation = spec.get("policy", {}).get("validation", {})
    if validation and "replicas" in spec.get("policy", {}):
        errors.append(("spec.policy.replicas", "give either replicas or validation, not both "
                                               "(replicas: N is validation: {quorum: N, adaptive: false})"))
    if validation.get("max_instances", 32) < validation.get("quorum", 1):
        errors.append(("spec.policy.validation.max_instances",
                       f"expected at least the quorum ({validation.get('quorum')}), got {validation['max_instances']}"))
    if errors:
        return errors
    n = 1
    for values in spec.get("sweep", {}).values():
        n *= len(values)
    n *= int(spec.get("policy", {}).get("replicas", 1))
    n *= max((r.shard_count or 1 for r in parse_inputs(spec.get("inputs", {})).values()), default=1)
    if n > max_tasks:
        errors.append(("spec.sweep", f"expands to {n:,} tasks, more than the limit of {max_tasks:,} per job; "
                                     "split it into several jobs"))
    elif base and expand:
        try:
            Manifest._build(source).points()
        except InvalidParams as exc:
            errors.extend(exc.errors)
    return errors


def _non_finite(source: dict[str, Any]) -> list[tuple[str, str]]:
    """NaN and infinities where the manifest's own fields hold numbers (JSON Schema cannot refuse them: NaN passes
    every ``minimum`` and ``maximum``, so ``timeout: NaN`` slipped under the 30-day bound and every hub's
    ``max_task_timeout_s``, and its lease never timed out). A kind's params and sweep values are the kind's to
    check (jobs/fields.py); ``inputs`` hold integers only (up to 100k shards: not walked)."""
    spec = source.get("spec")
    if not isinstance(spec, dict):
        return []
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [(f"spec.{key}", spec.get(key)) for key in ("requires", "resources", "policy")]
    while stack:   # the schema bounds these fields' depth and size: a plain walk
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append((path, f"expected a finite number, got {json.dumps(value)}"))
        elif isinstance(value, dict):
            stack.extend((path_text(path, key), inner) for key, inner in value.items())
        elif isinstance(value, list):
            stack.extend((path_text(path, i), inner) for i, inner in enumerate(value))
    return found


def _check_duration(value: Any, path: str, errors: list[tuple[str, str]], most_s: float | None = None) -> None:
    try:
        seconds = parse_duration(value)
    except BadRequest:
        errors.append((path, f"expected a duration like 90s, 10m or 6h, got {json.dumps(value)}"))
        return
    if most_s is not None and seconds > most_s:
        errors.append((path, f"{json.dumps(value)} is longer than the most any hub allows ({most_s / 86400:g}d)"))
