"""``panal results JOB -o DIR --merge``: a row-sharded job's outputs joined into one file per output.

Each shard's output file (safetensors, downloaded and checked against the digest its agent signed)
holds the rows ``row_start..row_end`` that the *signed manifest* gives its unit. Merging refuses,
naming the shard and its rows, unless every shard has a verified, validated result whose signed
row range and file header say exactly those rows; then each tensor is written as the shards'
tensors concatenated along dim 0 in input order. Row-major tensors concatenate along dim 0 byte for
byte, so the merge copies byte ranges straight from the shard files into the new file: no torch, and
memory bounded by one copy buffer whatever the data set's size. The file is written beside its
final name and renamed when complete, so a failed merge leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client.submitting import ResultCheck, output_file_name, task_dir_name
from jobs.committed import VIEW_MAX_TASKS, signed_manifest
from jobs.manifest import Manifest
from jobs.safeload import UnsafeInput, check_safetensors, read_metadata
from security.errors import BadRequest

__all__ = ["MergeError", "Shard", "merge_outputs", "merge_safetensors", "plan_shards"]

_COPY_BYTES = 1 << 20


class MergeError(BadRequest):
    """A job's outputs cannot be merged: a shard is missing, unvalidated or not what its manifest says."""

    code = "cannot_merge"


@dataclass(frozen=True)
class Shard:
    """One shard's chosen result: its unit, its rows (from the signed manifest) and its output files."""

    unit: int
    row_start: int
    row_end: int
    task_id: str
    files: dict[str, Path]


def merge_outputs(reply: dict[str, Any], checks: Sequence[ResultCheck], units: Sequence[dict[str, Any]],
                  out_dir: Path, validation_problems: Sequence[str] = ()) -> dict[str, Path]:
    """Merge every named output of the job in ``reply`` into ``out_dir``; return name -> merged file.

    ``checks`` are the verified results (with download problems folded in), ``units`` the per-unit
    validation rows (:func:`agent.client.validation.unit_rows`), and the shards' files are where
    :func:`agent.client.submitting.fetch_outputs` put them."""
    if validation_problems:
        raise MergeError("not merging: the board's validation records disagree with the signed results: "
                         + "; ".join(validation_problems))
    shards = plan_shards(reply, checks, units, out_dir)
    names = sorted(shards[0].files)
    merged = {}
    for name in names:
        example = next(c for c in checks if c.task_id == shards[0].task_id)
        dest = out_dir / output_file_name(name, (example.payload.get("outputs") or {})[name])
        merge_safetensors([(s.files[name], s.row_start, s.row_end, f"shard {s.unit}") for s in shards], dest)
        merged[name] = dest
    return merged


def plan_shards(reply: dict[str, Any], checks: Sequence[ResultCheck], units: Sequence[dict[str, Any]],
                out_dir: Path) -> list[Shard]:
    """The result to merge for each shard, in input order; :class:`MergeError` names every shard missing."""
    job_id = str(reply["job"]["id"])
    # (a committed one: its lists checked against its signed root)
    manifest = Manifest.from_dict(signed_manifest(reply["envelope"]), max_tasks=VIEW_MAX_TASKS)
    if not any(ref.shard_count for ref in manifest.inputs.values()):
        raise MergeError(f"job {job_id} is not sharded by rows: there is nothing to merge (its outputs are in "
                         f"{out_dir}/<task>/)")
    if any(len(v) > 1 for v in manifest.sweep.values()):
        raise MergeError(f"job {job_id} sweeps parameters as well as sharding rows: --merge joins the shards "
                         "of a single run; merge each sweep point's shards from the task folders")
    by_unit = {int(str(u["task_id"]).rsplit(".", 1)[1]): u for u in units}
    shards, missing = [], []
    for unit, params in enumerate(manifest.points()):
        start, end = int(params["row_start"]), int(params["row_end"])
        shard, why = _shard(unit, start, end, by_unit.get(unit), checks, out_dir)
        if shard is None:
            missing.append(f"shard {unit} (rows {start}..{end}, task {job_id}.{unit}): {why}")
        else:
            shards.append(shard)
    if missing:
        raise MergeError(f"cannot merge job {job_id}: {len(missing)} of {manifest.n_units} shard(s) are not "
                         "present and validated:\n  " + "\n  ".join(missing))
    names = set(shards[0].files)
    for shard in shards[1:]:
        if set(shard.files) != names:
            raise MergeError(f"shard {shard.unit} has outputs {sorted(shard.files)}, shard 0 has {sorted(names)}")
    return shards


def _shard(unit: int, start: int, end: int, row: dict[str, Any] | None, checks: Sequence[ResultCheck],
           out_dir: Path) -> tuple[Shard | None, str]:
    if row is None:
        return None, "no result yet"
    if row["state"] != "validated":
        return None, {"pending": "not validated yet (pending)", "no_consensus": "its agents disagree "
                      "(no_consensus)"}.get(str(row["state"]), f"state {row['state']}")
    agent = (row.get("canonical") or {}).get("agent_id")
    chosen = next((c for c in checks if c.task_id in row.get("instances", []) and c.agent == agent), None)
    if chosen is None or not chosen.ok:
        return None, f"no verified result ({chosen.problem if chosen else 'the canonical result is not listed'})"
    values = chosen.payload.get("values") or {}
    if (values.get("row_start"), values.get("row_end")) != (start, end):
        return None, (f"the agent's signed result covers rows {values.get('row_start')}..{values.get('row_end')}, "
                      f"not the manifest's {start}..{end}")
    files = {}
    for name, meta in (chosen.payload.get("outputs") or {}).items():
        path = out_dir / task_dir_name(chosen.task_id) / output_file_name(str(name), meta)
        if not path.is_file():
            return None, f"output {name} was not downloaded to {path}"
        files[str(name)] = path
    if not files:
        return None, "its result has no output files"
    return Shard(unit, start, end, chosen.task_id, files), ""


def merge_safetensors(parts: Sequence[tuple[Path, int, int, str]], dest: Path) -> None:
    """Concatenate the tensors of safetensors files ``(path, row_start, row_end, label)`` along dim 0.

    Every part must hold the same tensor names, dtypes and trailing shapes, and exactly
    ``row_end - row_start`` rows of each tensor (checked from the headers before a byte is copied)."""
    headers = []
    for path, start, end, label in parts:
        try:
            tensors, meta = check_safetensors(path), read_metadata(path)
        except UnsafeInput as exc:
            raise MergeError(f"{label} (rows {start}..{end}): {exc.reason}") from exc
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        headers.append((tensors, meta, 8 + header_len))
    first = headers[0][0]
    for (tensors, meta, _), (_, start, end, label) in zip(headers, parts, strict=True):
        if set(tensors) != set(first):
            raise MergeError(f"{label} holds tensors {sorted(tensors)}, the first shard {sorted(first)}")
        if meta.get("row_start", str(start)) != str(start) or meta.get("row_end", str(end)) != str(end):
            raise MergeError(f"{label}: its file says rows {meta.get('row_start')}..{meta.get('row_end')}, "
                             f"the manifest {start}..{end}")
        for name, info in tensors.items():
            want = first[name]
            if info.dtype != want.dtype or info.shape[1:] != want.shape[1:] or not info.shape:
                raise MergeError(f"{label}: tensor {name!r} is {info.dtype} {list(info.shape)}, the first shard's "
                                 f"{want.dtype} {list(want.shape)}")
            if info.shape[0] != end - start:
                raise MergeError(f"{label}: tensor {name!r} has {info.shape[0]} rows, not the {end - start} of "
                                 f"rows {start}..{end}")
    header: dict[str, Any] = {"__metadata__": _metadata([m for _, m, _ in headers], parts)}
    offset = 0
    for name in sorted(first):
        size = sum(t[name].end - t[name].start for t, _, _ in headers)
        header[name] = {"dtype": first[name].dtype, "data_offsets": [offset, offset + size],
                        "shape": [sum(t[name].shape[0] for t, _, _ in headers), *first[name].shape[1:]]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the data section starts 8-byte aligned, as safetensors writes it
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in sorted(first):
                for (tensors, _, data_start), (path, *_) in zip(headers, parts, strict=True):
                    _copy_range(path, data_start + tensors[name].start, tensors[name].end - tensors[name].start, out)
        check_safetensors(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _metadata(metas: list[dict[str, str]], parts: Sequence[tuple[Path, int, int, str]]) -> dict[str, str]:
    """The shards' common metadata, with the row range of the whole."""
    common = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas)}
    common.update(row_start=str(parts[0][1]), row_end=str(parts[-1][2]), shards=str(len(parts)))
    return common


def _copy_range(path: Path, start: int, length: int, out: Any) -> None:
    with path.open("rb") as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(_COPY_BYTES, length))
            if not chunk:
                raise MergeError(f"{path} ended {length} bytes early while merging")
            out.write(chunk)
            length -= len(chunk)
