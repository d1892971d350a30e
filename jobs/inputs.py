"""A manifest's ``spec.inputs``: files a task needs, and row shards that split a job into tasks.

In the YAML a user writes local paths (``model: ./model.pt2``, ``data: {path: x.safetensors,
shard: {by: rows, count: 20}}``). ``panal submit`` uploads each file as a content-addressed blob
and signs a manifest where every path became ``{blob: <sha256>, size: N, name: ...}`` (plus the
row count of a sharded file), so boards and agents never see a client path and can check every
byte they receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.kinds.base import Kind

__all__ = ["INPUT_SCHEMA", "InputRef", "check_inputs", "parse_inputs", "shard_count_problem", "shard_points"]

_SHARD = {"type": "object", "additionalProperties": False, "required": ["by", "count"],
          "properties": {"by": {"const": "rows"}, "count": {"type": "integer", "minimum": 1, "maximum": 100_000}}}
INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": 16,
    "propertyNames": {"pattern": r"^[a-z][a-z0-9_]{0,31}$"},
    "additionalProperties": {
        "anyOf": [
            {"type": "string", "minLength": 1, "description": "a local file, uploaded on submit"},
            {"type": "object", "additionalProperties": False,
             "properties": {
                 "path": {"type": "string", "minLength": 1},
                 "blob": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                 "size": {"type": "integer", "minimum": 0},
                 "name": {"type": "string"},
                 "rows": {"type": "integer", "minimum": 0},
                 "shard": _SHARD}},
        ],
    },
}


@dataclass(frozen=True)
class InputRef:
    name: str
    path: str | None = None        # before upload (client side)
    blob: str | None = None        # after upload: sha256 of the file
    size: int | None = None
    rows: int | None = None        # row count of a sharded file
    shard_count: int | None = None

    def to_source(self) -> dict[str, Any]:
        out: dict[str, Any] = {"blob": self.blob, "size": self.size, "name": self.path or self.name}
        if self.shard_count:
            out["shard"] = {"by": "rows", "count": self.shard_count}
            out["rows"] = self.rows
        return out


def parse_inputs(source: Mapping[str, Any]) -> dict[str, InputRef]:
    refs = {}
    for name, value in source.items():
        if isinstance(value, str):
            refs[name] = InputRef(name, path=value)
        else:
            shard = value.get("shard")
            refs[name] = InputRef(name, path=value.get("path"), blob=value.get("blob"), size=value.get("size"),
                                  rows=value.get("rows"), shard_count=shard["count"] if shard else None)
    return refs


def check_inputs(kind: Kind, refs: Mapping[str, InputRef], errors: list[tuple[str, str]]) -> None:
    declared = getattr(kind, "inputs", {}) or {}
    for name, ref in refs.items():
        where = f"spec.inputs.{name}"
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            errors.append((where, f"kind {kind.name} takes no input {name!r} (its inputs: {known})"))
        if (ref.path is None) == (ref.blob is None):
            errors.append((where, "give exactly one of a file path or an uploaded blob"))
        if ref.shard_count is not None:
            if not {"row_start", "row_end"} <= set(kind.params):
                errors.append((f"{where}.shard", f"kind {kind.name} cannot be sharded by rows"))
            if ref.blob is not None and ref.rows is None:
                errors.append((f"{where}.rows", "an uploaded sharded input needs its row count"))
            if ref.rows is not None and (why := shard_count_problem(ref.shard_count, ref.rows)) is not None:
                errors.append((f"{where}.shard.count", why))
    for name, required in declared.items():
        if required and name not in refs:
            errors.append((f"spec.inputs.{name}", f"kind {kind.name} needs input {name!r}"))
    if sum(1 for r in refs.values() if r.shard_count) > 1:
        errors.append(("spec.inputs", "only one input may be sharded"))


def shard_count_problem(count: int, rows: int) -> str | None:
    """Why ``count`` shards cannot split ``rows`` rows (None: they can). Refused, not clamped: the
    signed manifest then says exactly how many tasks the job has, and no shard is ever empty."""
    if rows == 0:
        return "the sharded tensor has no rows: there is nothing to split"
    if count > rows:
        return (f"count {count} is more shards than the {rows} rows to split (each shard needs a row); "
                f"use a count of at most {rows}")
    return None


def shard_points(refs: Mapping[str, InputRef]) -> list[dict[str, int]]:
    """The row-range parameters of each shard ([{}] when nothing is sharded)."""
    from jobs.kinds.inference import shard_rows

    for ref in refs.values():
        if ref.shard_count:
            total = ref.rows if ref.rows is not None else ref.shard_count
            return [dict(zip(("row_start", "row_end"), shard_rows(total, ref.shard_count, i), strict=True))
                    for i in range(ref.shard_count)]
    return [{}]
