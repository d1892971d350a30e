"""A manifest's ``spec.code``: the submitter's code, as written (a path) and as signed (input ``code``).

In the YAML a user writes ``code: ./train.py`` (a file), ``code: ./src`` (a folder) or
``code: {path: ./src, entry: pkg.train:main}``. ``panal validate``/``submit``/``run-local`` compile it
(jobs/code_bundle.py) and refuse a syntax error or a missing entry point, naming file and line,
before anything is uploaded; :func:`bundle_manifest` packs it and returns the manifest whose
``spec.inputs.code`` names the bundle file, which the ordinary input path then hashes, uploads and
signs by digest. The signed manifest has no ``spec.code``: boards and agents see only the digest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.code_bundle import ENTRY_PATTERN, check_tree, default_entry, pack
from jobs.inputs import InputRef
from jobs.kinds.base import Kind
from security.errors import BadRequest

if TYPE_CHECKING:
    from jobs.manifest import Manifest

__all__ = ["CODE_SCHEMA", "bundle_manifest", "code_problems", "code_source", "with_code"]

CODE_SCHEMA: dict[str, Any] = {
    # one schema for both forms (not anyOf), so a bad entry is reported at its own field path
    "description": "your code for task: python: a .py file or a folder (or {path, entry}), packed and "
                   "uploaded on submit",
    "type": ["string", "object"], "minLength": 1,
    "additionalProperties": False, "required": ["path"],
    "properties": {"path": {"type": "string", "minLength": 1},
                   "entry": {"type": "string", "pattern": ENTRY_PATTERN.pattern,
                             "description": "module:function (default: <file>:run, or main:run)"}},
}


def with_code(spec: Mapping[str, Any], kind: Kind, refs: dict[str, InputRef],
              errors: list[tuple[str, str]]) -> dict[str, InputRef]:
    """``refs`` plus the code as input ``code`` when ``spec.code`` gives it (so the kind's input checks
    see it); errors for code given twice or given to a kind that runs none."""
    code = spec.get("code")
    if code is None:
        return refs
    if "code" not in kind.inputs:
        errors.append(("spec.code", f"kind {kind.name} runs no code of yours; use task: python"))
        return refs
    if "code" in refs:
        errors.append(("spec.code", "give the code once: spec.code or spec.inputs.code, not both"))
        return refs
    path = code if isinstance(code, str) else code.get("path") if isinstance(code, Mapping) else None
    return {**refs, "code": InputRef("code", path=str(path))}


def code_source(manifest: Manifest) -> tuple[Path, str] | None:
    """(local path, entry point) of ``spec.code``, or None when the manifest has none."""
    code = manifest.source.get("spec", {}).get("code")
    if code is None:
        return None
    raw = code if isinstance(code, str) else code["path"]
    path = Path(raw) if Path(raw).is_absolute() else (manifest.base_dir or Path(".")) / raw
    entry = code.get("entry") if isinstance(code, Mapping) else None
    return path, str(entry or default_entry(path))


def code_problems(manifest: Manifest) -> list[tuple[str, str]]:
    """What stops ``spec.code`` from running, as (field path, ``file:line: message``): a missing path,
    a syntax error in any ``.py`` file, no entry module or function, a tree over the bundle's caps."""
    source = code_source(manifest)
    if source is None:
        return []
    path, entry = source
    if not path.exists():
        return [("spec.code", f"not found: {path}")]
    if not (path.is_file() or path.is_dir()):
        return [("spec.code", f"not a file or folder: {path}")]
    try:
        problems = check_tree(path, entry)
        if not problems:
            pack(path, entry)   # the size and link checks
    except BadRequest as exc:
        return [("spec.code", exc.message)]
    except OSError as exc:
        return [("spec.code", f"cannot read {path}: {exc}")]
    return [("spec.code", str(p)) for p in problems]


def bundle_manifest(manifest: Manifest, out_dir: Path) -> tuple[Manifest, Path | None]:
    """Pack ``spec.code`` into ``out_dir`` and return the manifest naming the bundle as input ``code``
    (and the bundle), ready for the ordinary input upload; unchanged when there is no ``spec.code``."""
    from jobs.manifest import Manifest

    source = code_source(manifest)
    if source is None:
        return manifest, None
    path, entry = source
    data = pack(path, entry)
    folder = out_dir / hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    bundle = folder / f"{path.stem or 'code'}.tar"
    if not bundle.is_file() or bundle.read_bytes() != data:
        bundle.write_bytes(data)
    signed = copy.deepcopy(manifest.source)
    del signed["spec"]["code"]
    signed["spec"].setdefault("inputs", {})["code"] = str(bundle.resolve())
    return dataclasses.replace(Manifest.from_dict(signed), base_dir=manifest.base_dir), bundle
