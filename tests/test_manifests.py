"""Manifests: strict validation with positions, for a table of broken files (nothing is ever submitted
from a file that fails: `panal submit` validates before it opens a connection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, panal

from jobs.manifest import ManifestError, manifest_schema
from jobs.manifest_files import load_manifests

HEAD = "apiVersion: panal/v1\nkind: Job\nmetadata: {name: t}\n"

CASES: list[tuple[str, str, str]] = [
    ("yaml syntax", HEAD + "spec: {task: matmul\n", "expected ',' or '}'"),
    ("tabs", HEAD + "spec:\n\ttask: matmul\n", "tab"),
    ("not a map", "- 1\n- 2\n", "a manifest must be a map"),
    ("empty file", "", "holds no manifest"),
    ("wrong api version", "apiVersion: panal/v2\nkind: Job\nmetadata: {name: t}\nspec: {task: sleep}\n",
     'expected "panal/v1"'),
    ("wrong kind", "apiVersion: panal/v1\nkind: Pod\nmetadata: {name: t}\nspec: {task: sleep}\n", 'expected "Job"'),
    ("missing spec", HEAD, "missing required field spec"),
    ("missing task", HEAD + "spec: {}\n", "missing required field task"),
    ("unknown kind", HEAD + "spec: {task: mine_bitcoin}\n", "unknown job kind 'mine_bitcoin'"),
    ("unknown top key", HEAD + "spec: {task: sleep}\nextra: 1\n", "unknown field 'extra'"),
    ("unknown spec key", HEAD + "spec: {task: sleep, retries: 3}\n", "unknown field 'retries'"),
    ("unknown param", HEAD + "spec: {task: sleep, params: {secs: 1}}\n", "spec.params.secs: unknown parameter"),
    ("wrong type", HEAD + "spec: {task: matmul, params: {size: four}}\n", "spec.params.size: expected an integer"),
    ("negative size", HEAD + "spec: {task: matmul, params: {size: -4}}\n", "spec.params.size"),
    ("huge size", HEAD + "spec: {task: matmul, params: {size: 10000000}}\n", "spec.params.size"),
    ("bad dtype", HEAD + "spec: {task: matmul, params: {dtype: float8}}\n", "spec.params.dtype"),
    ("bad vram", HEAD + "spec:\n  task: sleep\n  requires: {min_vram_gb: four}\n",
     "spec.requires.min_vram_gb: expected a number"),
    ("bad device", HEAD + "spec:\n  task: sleep\n  requires: {device: tpu}\n", "spec.requires.device"),
    ("bad timeout", HEAD + "spec:\n  task: sleep\n  resources: {timeout: soon}\n", "spec.resources.timeout"),
    ("priority range", HEAD + "spec:\n  task: sleep\n  policy: {priority: 1000}\n", "spec.policy.priority"),
    ("huge sweep", HEAD + "spec:\n  task: sleep\n  sweep: {seconds: " + json.dumps([0] * 200) + "}\n"
     "  policy: {replicas: 16}\n", "3,200 tasks, more than the limit of 1,000"),
    ("sweep unknown", HEAD + "spec:\n  task: sleep\n  sweep: {nope: [1, 2]}\n", "spec.sweep.nope"),
    ("sweep bad value", HEAD + "spec:\n  task: sleep\n  sweep: {seconds: [1, -1]}\n", "spec.sweep.seconds[1]"),
    ("duplicate keys", HEAD + "spec:\n  task: sleep\n  task: matmul\n", "duplicate key"),
    ("anchors", HEAD + "spec: &a {task: sleep}\nx: *a\n", "aliases"),
    ("billion laughs", "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n", "aliases"),
    ("missing input file", HEAD + "spec:\n  task: inference\n  inputs: {model: nope.pt2, data: nope.st}\n",
     "file not found: nope.pt2"),
    ("missing required input", HEAD + "spec:\n  task: inference\n  inputs: {model: x.pt2}\n",
     "needs input 'data'"),
    ("unknown input", HEAD + "spec:\n  task: matmul\n  inputs: {weights: x.bin}\n", "takes no input 'weights'"),
    ("shard unshardable", HEAD + "spec:\n  task: mlp_train\n  inputs: {data: {path: x, shard: {by: rows, count: 2}}}\n",
     "cannot be sharded"),
    ("bad name", "apiVersion: panal/v1\nkind: Job\nmetadata: {name: 'has space'}\nspec: {task: sleep}\n",
     "metadata.name"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in CASES], ids=[c[0] for c in CASES])
def test_malformed_manifest_gets_a_specific_positioned_message(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as exc:
        load_manifests(path, max_tasks=1000)
    message = exc.value.message
    assert expected in message, message
    assert all(line.startswith(str(path) + ":") for line in message.splitlines()), message


def test_several_problems_are_reported_at_once_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + "spec:\n  task: matmul\n  params:\n    size: four\n    dtype: float8\n"
                    "  requires: {min_vram_gb: -1}\n")
    with pytest.raises(ManifestError) as exc:
        load_manifests(path)
    lines = exc.value.message.splitlines()
    assert lines == [f"{path}:7:5: spec.params.size: expected an integer, got 'four'",
                     f"{path}:8:5: spec.params.dtype: expected one of float32, float16, bfloat16, got 'float8'",
                     f"{path}:9:14: spec.requires.min_vram_gb: expected a number >= 0, got -1"]


def test_several_documents_make_several_manifests(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(HEAD + "spec: {task: sleep}\n---\n" + HEAD.replace("name: t", "name: u") + "spec: {task: matmul}\n")
    assert [m.name for m in load_manifests(path)] == ["t", "u"]


def test_schema_is_published_and_validate_cli_reports(tmp_path: Path) -> None:
    schema = json.loads(panal("schema", home=tmp_path).stdout)
    assert "inputs" in schema["properties"]["spec"]["properties"]
    assert set(schema["properties"]["spec"]["properties"]["task"]["enum"]) >= {"matmul", "sleep", "inference"}
    assert manifest_schema()["$schema"].endswith("2020-12/schema")
    ok = panal("validate", str(ROOT / "configs/examples/matmul.yaml"), home=tmp_path)
    assert "ok (matmul" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "spec: {task: matmul, params: {size: four}}\n")
    out = panal("validate", str(bad), home=tmp_path, check=False)
    assert out.returncode == 1 and "spec.params.size" in out.stderr and "Traceback" not in out.stderr


def test_readme_manifest_section_covers_every_spec_field() -> None:
    """The README's 'Writing a manifest' table is checked against the published schema."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Writing a manifest", 1)[1].split("\n## ", 1)[0]
    spec = manifest_schema()["properties"]["spec"]["properties"]
    for field in spec:
        assert f"`spec.{field}`" in section, f"README does not document spec.{field}"
    for field in spec["requires"]["properties"]:
        assert f"`{field}`" in section, f"README does not document spec.requires.{field}"
    for kind in spec["task"]["enum"]:
        assert kind == "chaos" or f"`{kind}`" in section, f"README does not list kind {kind}"
