"""Manifests read from YAML files (``panal submit``, ``panal validate``, ``panal run``): every problem of every
document in one error, each with its file, line and column, and input files checked to exist beside the file.
The manifest model and its validation are ``jobs/manifest.py``; this is what a file on the submitter's disk adds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jobs.code_spec import code_problems
from jobs.inputs import missing_paths
from jobs.manifest import DEFAULT_MAX_TASKS, Manifest, ManifestError, validate
from jobs.yamlpos import Document, load_documents

__all__ = ["load_manifests"]


def load_manifests(path: Path, max_tasks: int = DEFAULT_MAX_TASKS) -> list[Manifest]:
    """Read a YAML file of one or more manifests; raise :class:`ManifestError` with positions."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([(None, "", f"{path}: cannot read: {exc}")]) from exc
    docs, yaml_errors = load_documents(text)
    name = str(path)
    problems: list[tuple[tuple[str, int, int] | None, str, str]] = [
        ((name, e.line, e.column), "", e.message) for e in yaml_errors
    ]
    if not problems and not docs:
        problems.append(((name, 1, 1), "", "file holds no manifest"))
    manifests = []
    for doc in docs:
        errs = validate(doc.value, max_tasks)
        if not errs:
            manifest = dataclasses.replace(Manifest._build(doc.value), base_dir=path.parent)
            errs = _missing_files(manifest) + code_problems(manifest)
            if not errs:
                manifests.append(manifest)
        problems.extend(sorted(((name, *_pos(doc, p)), p, m) for p, m in errs))
    if problems:
        raise ManifestError(problems)
    return manifests


def _missing_files(manifest: Manifest) -> list[tuple[str, str]]:
    errors = []
    for ref in manifest.inputs.values():
        errors += missing_paths(ref, manifest.base_dir or Path("."))
        if ref.path is not None:
            full = (manifest.base_dir or Path(".")) / ref.path
            if not full.is_file():
                where = f"spec.inputs.{ref.name}" + (".path" if ref.shard_count else "")
                errors.append((where, f"file not found: {ref.path} (looked in {full.parent})"))
    return errors


def _pos(doc: Document, path: str) -> tuple[int, int]:
    return doc.where(path)
