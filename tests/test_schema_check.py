"""The manifest's compiled structural check (jobs/schema_check.py) never passes what jsonschema refuses, and
leaves the messages users read to jsonschema."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs import manifest
from jobs.manifest import Manifest, ManifestError, validate

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml"))
#: what a careless or hostile submitter puts where a value belongs
ODD_VALUES: list[Any] = [None, True, 0, -1, 1.5, 1.0, 10**30, float("nan"), float("inf"), "", "x", "a\n", "-5",
                         "1h", "٣", [], [1], ["a"], {}, {"x": 1}, "x" * 300]


def documents() -> list[dict[str, Any]]:
    docs = [doc for path in EXAMPLES for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]
    assert len(docs) >= len(EXAMPLES) >= 5
    return docs


def paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from paths(inner, (*at, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value[:3]):
            yield from paths(inner, (*at, i))


def mutated(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The manifest with each value (at every depth) replaced by each odd value, an unknown key added to each
    map, and each map's keys dropped one at a time."""
    for at in paths(doc):
        if not at:
            continue
        for odd in ODD_VALUES:
            bad = copy.deepcopy(doc)
            parent = bad
            for part in at[:-1]:
                parent = parent[part]
            parent[at[-1]] = odd
            yield bad
        target: Any = doc
        for part in at:
            target = target[part]
        if isinstance(target, dict):
            for key in [*target, "unknown_field"]:
                bad = copy.deepcopy(doc)
                inner = bad
                for part in at:
                    inner = inner[part]
                if key in inner:
                    del inner[key]
                else:
                    inner[key] = 1
                yield bad


def test_the_compiled_check_passes_every_example_manifest() -> None:
    for doc in documents():
        assert manifest._VALIDATOR.fast_ok(doc), doc.get("metadata")


def test_the_compiled_check_never_passes_what_jsonschema_refuses() -> None:
    checked = refused = 0
    for doc in documents():
        for bad in mutated(doc):
            errors = list(manifest._VALIDATOR.full.iter_errors(bad))
            refused += bool(errors)
            if manifest._VALIDATOR.fast_ok(bad):
                assert not errors, (bad, [e.message for e in errors])
            checked += 1
    assert checked > 1000 and refused > 500   # the corpus does hold plenty of broken manifests


def test_a_broken_manifest_still_gets_jsonschemas_messages() -> None:
    doc = documents()[0]
    doc["metadata"]["name"] = 5
    doc["spec"]["bogus"] = True
    assert not manifest._VALIDATOR.fast_ok(doc)
    messages = dict(validate(doc))
    assert messages["metadata.name"] == "expected a string, got 5"
    assert "spec.bogus" in messages
    with pytest.raises(ManifestError, match=r"metadata\.name: expected a string, got 5"):
        Manifest.from_dict(doc)


def test_a_name_jsonschema_lets_by_is_still_accepted_through_the_slow_path() -> None:
    doc = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "trailing\n"},
           "spec": {"task": "sleep", "sweep": {"seconds": [0.0]}}}
    assert not manifest._VALIDATOR.fast_ok(doc)     # the compiled pattern is the stricter one ...
    assert validate(doc) == []                      # ... and changes nothing a submitter sees
