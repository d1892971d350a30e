"""Submit-time checks of a manifest's local input files: what an agent would refuse, found before upload.

``panal validate`` and ``panal submit`` run here the same safe-loading checks an agent runs
(:mod:`jobs.safeload`: a ``.pt2`` archive's members, operators and embedded pickles; a safetensors
header against its file) plus each kind's header checks (:meth:`jobs.kinds.base.Kind.check_input`:
tensor names, dtypes and shapes), and a row shard's ``count`` against the rows it splits. Only
headers and archive listings are read: nothing is unpickled, loaded or executed, so checking a
hostile file is as safe as refusing it. Every problem names the input as the manifest does
(``spec.inputs.model``) and says how to fix it; :func:`explain_refusal` gives an agent's refusal the
same words.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.catalog import get_kind
from jobs.inputs import expand_paths, shard_count_problem
from jobs.safeload import TensorInfo, UnsafeInput, check_pt2, check_safetensors
from security.errors import BadRequest

if TYPE_CHECKING:
    from jobs.manifest import Manifest

__all__ = ["check_local_inputs", "explain_refusal", "model_fix", "shard_rows_of"]

_EXPORT_FIX = ("export the model with torch.export.export(model, example_inputs) and save it with "
               "torch.export.save(program, 'model.pt2')")
_OPERATOR_FIX = ("agents run only the operator families torch.ops.aten and torch.ops.prims (and Python's "
                 "operator module): control flow such as torch.cond or torch.while_loop and custom operators "
                 "(torch.library) are refused; rewrite those parts with plain tensor operations (e.g. "
                 "torch.where for a branch), then " + _EXPORT_FIX)


def check_local_inputs(manifest: Manifest) -> list[tuple[str, str]]:
    """(field path, message) for each local input file an agent would refuse (empty: none).

    Inputs already uploaded (``blob:``) are not here to read and are skipped; the board checks their
    declared row counts (:func:`shard_count_problem`)."""
    kind = get_kind(manifest.kind)
    param_sets = list(_distinct_params(manifest))
    problems: list[tuple[str, str]] = []
    base = manifest.base_dir or Path(".")
    for name, ref in manifest.inputs.items():
        if ref.path is not None:
            files = [(base / ref.path, ref.path)]
        elif ref.paths is not None:   # a data set already split: every file is one shard
            try:
                files = [(p, str(p.relative_to(base)) if p.is_relative_to(base) else str(p))
                         for p in expand_paths(ref.paths, base)]
            except BadRequest:
                continue   # a pattern matching nothing: load_manifests names it
        else:
            continue
        where = f"spec.inputs.{name}"
        formats = {kind.input_format(name, params) for params in param_sets} - {None}
        for path, shown in files:
            try:
                if "pt2" in formats:
                    check_pt2(path)
                if "safetensors" in formats or ref.shard_count or ref.paths is not None:
                    tensors = check_safetensors(path)
                    found = {why for params in param_sets for why in kind.check_input(name, tensors, params)}
                    problems.extend((where, f"{shown}: {why}") for why in sorted(found))
                    rows = shard_rows_of(tensors, manifest.params)
                    why = shard_count_problem(ref.shard_count or 1, rows) if not found and \
                        (ref.shard_count or ref.paths is not None) else None
                    if why is not None:
                        problems.append((f"{where}.shard.count" if ref.shard_count else where, f"{shown}: {why}"))
            except UnsafeInput as exc:
                problems.append((where, f"{shown}: {exc.reason}; {model_fix(path, exc.reason)}"
                                 if "pt2" in formats else f"{shown}: {exc.reason}"))
    return problems


def shard_rows_of(tensors: dict[str, TensorInfo], params: dict[str, Any]) -> int:
    """Rows a row shard splits: dim 0 of the ``input_key`` tensor (else the first tensor)."""
    info = tensors.get(str(params.get("input_key", ""))) or next(iter(tensors.values()), None)
    if info is None:
        return 0
    return int(info.shape[0]) if info.shape else 1


def explain_refusal(name: str, exc: UnsafeInput, path: Path | None = None) -> str:
    """An agent's refusal of an input, in the words ``panal validate`` uses: the manifest's input name,
    never the blob's digest, and the fix (for a model)."""
    where = f"input {name!r} (spec.inputs.{name})"
    if path is not None and _is_model_failure(exc.reason):
        return f"{where} refused: {exc.reason}; {model_fix(path, exc.reason)}"
    return f"{where} refused: {exc.reason}"


def model_fix(path: Path, reason: str) -> str:
    """How to turn the refused model file at ``path`` into one agents load (by what the file is)."""
    if "operator" in reason:
        return _OPERATOR_FIX
    what = _sniff(path)
    if what == "torchscript":
        return "this is a TorchScript file (torch.jit.save), whose code agents never run; " + _EXPORT_FIX
    if what == "torch.save":
        return "this is a torch.save pickle, which could run code when loaded; " + _EXPORT_FIX
    return _EXPORT_FIX


def _is_model_failure(reason: str) -> bool:
    return not reason.startswith(("cannot read", "safetensors"))


def _sniff(path: Path) -> str:
    """What a model file is, from its zip listing or first bytes (read-only, nothing unpickled)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = {n.split("/", 1)[1] if "/" in n else n for n in archive.namelist()}
            if "archive_format" in members:
                return "pt2"
            if "constants.pkl" in members or any(m.startswith("code/") for m in members):
                return "torchscript"
            return "torch.save" if "data.pkl" in members else "zip"
        with path.open("rb") as f:
            head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return "unreadable"
    return "torch.save" if head[:1] == b"\x80" else "other"


def _distinct_params(manifest: Manifest) -> Iterator[dict[str, Any]]:
    """Each distinct parameter set of the job's units (row ranges aside): input checks may depend on
    parameters a sweep changes (``input_key``, ``arch``, ``input_size``)."""
    seen: set[str] = set()
    for params in manifest.points():
        rest = {k: v for k, v in params.items() if k not in ("row_start", "row_end", "data_offset")}
        key = json.dumps(rest, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            yield rest
