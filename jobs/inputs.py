"""A manifest's ``spec.inputs``: files a task needs, and row shards that split a job into tasks.

In the YAML a user writes local paths (``model: ./model.pt2``, ``data: {path: x.safetensors,
shard: {by: rows, count: 20}}``, or a data set already split: ``data: {paths: ["part-*.safetensors"]}``).
``panal submit`` uploads each file as a content-addressed blob and signs a manifest where every path
became ``{blob: <sha256>, size: N, name: ...}``, so boards and agents never see a client path and can
check every byte they receive.

A sharded input becomes one blob per shard (``agent/client/sharding.py`` splits a file by rows):
``{name, rows, shard: {by: rows, count: N}, shards: [{blob, size, rows}, ...]}``, the shards in row
order. The signed manifest thus binds every shard's digest to its row range, and a task's
``row_start``/``row_end`` pick exactly one (:func:`input_blob`): an agent downloads only that shard,
and a board that hands it another one is caught by the hash. A manifest signed before this (one
``blob`` for the whole sharded file) still runs: its tasks read their rows from the whole file.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.kinds.base import Kind
from security.errors import BadRequest

__all__ = ["INPUT_SCHEMA", "InputRef", "ShardRef", "check_inputs", "expand_paths", "input_blob", "missing_paths",
           "parse_inputs", "shard_count_problem", "shard_points"]

MAX_SHARDS = 100_000

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
                 "shard": _SHARD,
                 "paths": {"type": "array", "minItems": 1, "maxItems": 1000,
                           "items": {"type": "string", "minLength": 1},
                           "description": "files (glob patterns, sorted) that are already the row shards"},
                 "shards": {"type": "array", "minItems": 1, "maxItems": MAX_SHARDS, "items": {
                     "type": "object", "additionalProperties": False, "required": ["blob", "size", "rows"],
                     "properties": {"blob": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                    "size": {"type": "integer", "minimum": 0},
                                    "rows": {"type": "integer", "minimum": 0}}}}}},
        ],
    },
}


@dataclass(frozen=True)
class ShardRef:
    """One uploaded shard of a sharded input: its blob and how many rows it holds."""

    blob: str
    size: int
    rows: int


@dataclass(frozen=True)
class InputRef:
    name: str
    path: str | None = None        # before upload (client side)
    blob: str | None = None        # after upload: sha256 of the file
    size: int | None = None
    rows: int | None = None        # row count of a sharded file
    shard_count: int | None = None
    paths: tuple[str, ...] | None = None     # before upload: files (globs) that are the shards
    shards: tuple[ShardRef, ...] | None = None   # after upload: one blob per shard, in row order
    label: str | None = None       # after upload: the file's name as the submitter knew it
    #: the row ``shards[0]`` starts at: 0, but for one unit of a committed job (jobs/committed.py), whose
    #: one proven shard is somewhere in the middle of the input
    first_row: int = 0

    def to_source(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.label or self.path or self.name}
        if self.shards is None:
            out.update(blob=self.blob, size=self.size)
        else:
            out["shards"] = [{"blob": s.blob, "size": s.size, "rows": s.rows} for s in self.shards]
        if self.shard_count:
            out["shard"] = {"by": "rows", "count": self.shard_count}
            out["rows"] = self.rows
        return out

    def shard_bounds(self) -> list[tuple[int, int]]:
        """Rows ``[start, end)`` of each uploaded shard (empty when the input is not split in blobs)."""
        bounds, start = [], self.first_row
        for s in self.shards or ():
            bounds.append((start, start + s.rows))
            start += s.rows
        return bounds


def parse_inputs(source: Mapping[str, Any]) -> dict[str, InputRef]:
    refs = {}
    for name, value in source.items():
        if isinstance(value, str):
            refs[name] = InputRef(name, path=value)
        else:
            shard = value.get("shard")
            shards = value.get("shards")
            paths = value.get("paths")
            refs[name] = InputRef(name, path=value.get("path"), label=value.get("name"),
                                  blob=value.get("blob"), size=value.get("size"),
                                  rows=value.get("rows"), shard_count=shard["count"] if shard else None,
                                  paths=tuple(paths) if paths is not None else None,
                                  shards=tuple(ShardRef(s["blob"], s["size"], s["rows"]) for s in shards)
                                  if shards is not None else None)
    return refs


def check_inputs(kind: Kind, refs: Mapping[str, InputRef], errors: list[tuple[str, str]]) -> None:
    declared = getattr(kind, "inputs", {}) or {}
    for name, ref in refs.items():
        where = f"spec.inputs.{name}"
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            errors.append((where, f"kind {kind.name} takes no input {name!r} (its inputs: {known})"))
        _check_ref(kind, ref, where, errors)
    for name, required in declared.items():
        if required and name not in refs:
            errors.append((f"spec.inputs.{name}", f"kind {kind.name} needs input {name!r}"))
    if sum(1 for r in refs.values() if r.shard_count) > 1:
        errors.append(("spec.inputs", "only one input may be sharded"))


def _check_ref(kind: Kind, ref: InputRef, where: str, errors: list[tuple[str, str]]) -> None:
    given = [k for k, v in (("path", ref.path), ("paths", ref.paths),
                            ("blob", ref.blob), ("shards", ref.shards)) if v is not None]
    if len(given) != 1:
        errors.append((where, "give exactly one of a file path, a list of shard files (paths) or an uploaded "
                              f"blob (got {', '.join(given) or 'none'})"))
    if ref.shard_count is None and ref.paths is None and ref.shards is None:
        return
    if not {"row_start", "row_end"} <= set(kind.params):
        errors.append((f"{where}.shard", f"kind {kind.name} cannot be sharded by rows"))
    if ref.paths is not None and ref.shard_count is not None:
        errors.append((f"{where}.shard", "a list of files is already the shard set: give paths or shard, not both"))
    if ref.blob is not None and ref.rows is None:
        errors.append((f"{where}.rows", "an uploaded sharded input needs its row count"))
    if ref.shard_count is not None and ref.rows is not None \
            and (why := shard_count_problem(ref.shard_count, ref.rows)) is not None:
        errors.append((f"{where}.shard.count", why))
    if ref.shards is not None:
        if "data_offset" not in kind.params:
            errors.append((f"{where}.shards", f"kind {kind.name} cannot read a shard blob"))
        if ref.shard_count != len(ref.shards):
            errors.append((f"{where}.shards", f"{len(ref.shards)} shard blobs for shard.count {ref.shard_count}"))
        if ref.rows != sum(s.rows for s in ref.shards):
            errors.append((f"{where}.rows", f"the shards hold {sum(s.rows for s in ref.shards)} rows, "
                                            f"not {ref.rows}"))
        empty = [i for i, s in enumerate(ref.shards) if s.rows == 0]
        if empty:
            errors.append((f"{where}.shards[{empty[0]}]", "a shard holds no rows (each task needs at least one)"))


def shard_count_problem(count: int, rows: int) -> str | None:
    """Why ``count`` shards cannot split ``rows`` rows (None: they can). Refused, not clamped: the
    signed manifest then says exactly how many tasks the job has, and no shard is ever empty."""
    if rows == 0:
        return "the sharded tensor has no rows: there is nothing to split"
    if count > rows:
        return (f"count {count} is more shards than the {rows} rows to split (each shard needs a row); "
                f"use a count of at most {rows}")
    return None


def input_blob(ref: InputRef, params: Mapping[str, Any]) -> str:
    """The blob a task with ``params`` needs for input ``ref``: for an input split in shard blobs, the one
    shard whose rows are the task's ``row_start``..``row_end`` (both from the signed manifest, so the
    digest binds the rows); else the input's one blob."""
    if ref.shards is None:
        if ref.blob is None:
            raise BadRequest(f"input {ref.name} was not uploaded", code="input_not_uploaded")
        return ref.blob
    rows = (params.get("row_start"), params.get("row_end"))
    for (start, end), shard in zip(ref.shard_bounds(), ref.shards, strict=True):
        if (start, end) == rows and params.get("data_offset") == start:
            return shard.blob
    raise BadRequest(f"input {ref.name}: no shard holds rows {rows[0]}..{rows[1]} from offset "
                     f"{params.get('data_offset')}", code="no_such_shard")


def shard_points(refs: Mapping[str, InputRef]) -> list[dict[str, int]]:
    """The row-range parameters of each shard ([{}] when nothing is sharded); a task of an input split in
    shard blobs also gets ``data_offset``, the row its shard file starts at."""
    from jobs.kinds.inference import shard_rows

    for ref in refs.values():
        if ref.shards is not None:
            return [{"row_start": start, "row_end": end, "data_offset": start} for start, end in ref.shard_bounds()]
        if ref.shard_count:
            total = ref.rows if ref.rows is not None else ref.shard_count
            return [dict(zip(("row_start", "row_end"), shard_rows(total, ref.shard_count, i), strict=True))
                    for i in range(ref.shard_count)]
    return [{}]


def expand_paths(patterns: tuple[str, ...], base_dir: Path) -> list[Path]:
    """The files a ``paths`` list names, in order: each pattern's matches sorted (a file named twice is
    one shard once); a pattern that matches nothing is an error naming it."""
    found: list[Path] = []
    for pattern in patterns:
        full = Path(pattern) if Path(pattern).is_absolute() else base_dir / pattern
        matches = sorted(Path(p) for p in glob.glob(str(full)) if Path(p).is_file())
        if not matches:
            raise BadRequest(f"no file matches {pattern!r} (looked in {full.parent})", code="file_not_found")
        found.extend(m for m in matches if m not in found)
    return found


def missing_paths(ref: InputRef, base_dir: Path) -> list[tuple[str, str]]:
    """A ``paths`` pattern that matches no file, as a (field path, message) pair (globs sorted at submit)."""
    problems = []
    for i, pattern in enumerate(ref.paths or ()):
        full = Path(pattern) if Path(pattern).is_absolute() else base_dir / pattern
        if not any(Path(p).is_file() for p in glob.glob(str(full))):
            problems.append((f"spec.inputs.{ref.name}.paths[{i}]",
                             f"no file matches {pattern!r} (looked in {full.parent})"))
    return problems
