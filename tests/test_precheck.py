"""Inputs an agent would refuse are refused at `panal validate` / `panal submit`, naming the input and the fix;
a refusal that does reach an agent names the input by its manifest name, never by its blob digest."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, panal
from safetensors.torch import save_file

from agent.engine.runner import TaskRequest, Worker
from jobs.manifest import Manifest, ManifestError

DATA = ROOT / "configs/examples/data"


@torch.library.custom_op("panal_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Branchy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))


class _Custom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice(x)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model file of each kind agents refuse, made the way a researcher would make it."""
    out = tmp_path_factory.mktemp("models")
    example = (torch.randn(3, 8),)
    torch.export.save(torch.export.export(_Branchy(), example), str(out / "cond.pt2"))
    torch.export.save(torch.export.export(_Custom(), example), str(out / "custom.pt2"))
    linear = torch.nn.Linear(8, 3)
    torch.save(linear, str(out / "pickled.pt"))
    torch.jit.save(torch.jit.script(linear), str(out / "scripted.pt"))
    return {p.stem: p for p in out.iterdir()}


def manifest(folder: Path, name: str, model: str, data: str = "inputs.safetensors", count: int = 2,
             params: str = "{arch: export, input_key: x}") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"apiVersion: panal/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
                    f"spec:\n  task: inference\n  params: {params}\n"
                    f"  inputs:\n    model: {model}\n    data: {{path: {data}, shard: {{by: rows, count: {count}}}}}\n")
    return path


@pytest.fixture
def job_dir(tmp_path: Path, models: dict[str, Path]) -> Path:
    for path in [*models.values(), DATA / "model.pt2", DATA / "inputs.safetensors"]:
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_validate_refuses_every_model_an_agent_would_refuse_naming_the_input_and_the_fix(job_dir: Path) -> None:
    files = [manifest(job_dir, stem, name) for stem, name in
             (("cond", "cond.pt2"), ("custom", "custom.pt2"), ("pickled", "pickled.pt"), ("scripted", "scripted.pt"),
              ("fine", "model.pt2"))]
    out = panal("validate", *map(str, files), home=job_dir / "home", check=False)
    assert out.returncode == 1
    lines = {line.split(":")[0].removesuffix(".yaml").rsplit("/", 1)[1]: line for line in out.stderr.splitlines()}
    assert set(lines) == {"cond", "custom", "pickled", "scripted"}, out.stderr
    assert all("spec.inputs.model" in line and "torch.export.save" in line for line in lines.values())
    assert "torch.ops.higher_order.cond" in lines["cond"] and "torch.cond" in lines["cond"]
    assert "torch.ops.panal_test.twice" in lines["custom"] and "torch.ops.aten and torch.ops.prims" in lines["custom"]
    assert "torch.save pickle" in lines["pickled"] and "TorchScript" in lines["scripted"]
    assert "fine: ok (inference, 2 tasks" in out.stdout


def test_submit_refuses_a_refused_model_before_contacting_any_board(job_dir: Path) -> None:
    path = manifest(job_dir, "cond", "cond.pt2")
    # port 9 (discard) on loopback: had the check not refused first, this would be a network error
    out = panal("submit", str(path), "--hub", "http://127.0.0.1:9", home=job_dir / "home", check=False)
    assert out.returncode == 1
    assert "spec.inputs.model: cond.pt2" in out.stderr and "torch.export.save" in out.stderr
    assert "network" not in out.stderr and "uploading" not in out.stderr


def test_validate_refuses_more_shards_than_rows_and_a_missing_input_key(job_dir: Path) -> None:
    too_many = manifest(job_dir, "many", "model.pt2", count=65)          # the example data has 64 rows
    wrong_key = manifest(job_dir, "key", "model.pt2", params="{arch: export, input_key: features}")
    just_right = manifest(job_dir, "all", "model.pt2", count=64)
    out = panal("validate", str(too_many), str(wrong_key), str(just_right), home=job_dir / "home", check=False)
    assert out.returncode == 1
    assert ("many: spec.inputs.data.shard.count: inputs.safetensors: count 65 is more shards than the 64 rows"
            in out.stderr), out.stderr
    assert "use a count of at most 64" in out.stderr
    assert "key: spec.inputs.data: inputs.safetensors: data has no tensor 'features' (has: x)" in out.stderr
    assert "all: ok (inference, 64 tasks" in out.stdout
    empty = job_dir / "empty.safetensors"
    save_file({"x": torch.zeros(0, 8)}, str(empty))
    out = panal("validate", str(manifest(job_dir, "none", "model.pt2", data="empty.safetensors", count=1)),
                home=job_dir / "home", check=False)
    assert "spec.inputs.data.shard.count" in out.stderr and "no rows" in out.stderr


def test_a_board_refuses_a_signed_manifest_with_more_shards_than_rows() -> None:
    source = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "five-of-three"},
              "spec": {"task": "inference", "inputs": {
                  "model": {"blob": "a" * 64, "size": 10, "name": "model.pt2"},
                  "data": {"blob": "b" * 64, "size": 10, "name": "x.safetensors", "rows": 3,
                           "shard": {"by": "rows", "count": 5}}}}}
    with pytest.raises(ManifestError, match=r"spec\.inputs\.data\.shard\.count: count 5 is more shards than the 3"):
        Manifest.from_dict(source)
    source["spec"]["inputs"]["data"]["shard"]["count"] = 3
    assert Manifest.from_dict(source).n_tasks == 3


async def test_an_agent_refusal_names_the_input_not_its_digest(tmp_path: Path, models: dict[str, Path]) -> None:
    cached = {}
    for name, source in (("model", models["pickled"]), ("data", DATA / "inputs.safetensors")):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        cached[name] = tmp_path / digest          # as the agent's blob cache names files
        shutil.copy(source, cached[name])
    worker = Worker({"PANAL_WORKER_PRELOAD": "0"})
    await worker.start()
    try:
        outcome = await worker.run(TaskRequest(kind="inference", params={"arch": "export"}, timeout_s=60,
                                               workdir=str(tmp_path / "work"),
                                               inputs={k: str(v) for k, v in cached.items()}))
    finally:
        await worker.close()
    assert (outcome.ok, outcome.error_class) == (False, "invalid_params")
    error = outcome.error or ""
    assert "input 'model' (spec.inputs.model) refused" in error and "torch.export.save" in error, error
    assert cached["model"].name not in error


def test_validate_checks_a_training_set_against_the_model_sizes_before_upload(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(20, 5), "y": torch.zeros(20, dtype=torch.int64)}, str(tmp_path / "train.safetensors"))
    save_file({"x": torch.zeros(4, 6), "y": torch.zeros(4)}, str(tmp_path / "val.safetensors"))
    path = tmp_path / "train.yaml"
    path.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: train}\n"
                    "spec:\n  task: mlp_train\n  params: {input_size: 6, output_size: 2}\n"
                    "  inputs: {data: train.safetensors, val_data: val.safetensors}\n")
    out = panal("validate", str(path), home=tmp_path / "home", check=False)
    assert out.returncode == 1
    assert "spec.inputs.data: train.safetensors: dataset x has 5 columns but input_size is 6" in out.stderr
    assert "spec.inputs.val_data: val.safetensors: validation dataset y must be 1-D integer labels" in out.stderr
