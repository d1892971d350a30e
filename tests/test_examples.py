"""Every example manifest in configs/examples validates, and its tasks run on this CPU."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from jobs.catalog import all_kinds, get_kind
from jobs.code_spec import bundle_manifest
from jobs.kinds.inference import shard_rows
from jobs.manifest_files import load_manifests
from jobs.report import metric_value
from jobs.safeload import check_safetensors, load_pt2

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


@dataclass
class LocalContext:
    workdir: Path
    device: str = "cpu"
    threads: int = 1
    inputs: Mapping[str, Path] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)
    fractions: list[float] = field(default_factory=list)

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def checkpoint(self, path: Path) -> None:
        shutil.copyfile(path, self.workdir / "stored-checkpoint.safetensors")


def run_points(kind: str, points: list[dict[str, Any]], tmp_path: Path, **inputs: Path) -> list[Any]:
    torch.set_num_threads(1)
    outputs = []
    distinct = [p for i, p in enumerate(points) if p not in points[:i]]
    for i, params in enumerate(distinct):
        work = tmp_path / f"task-{i}"
        work.mkdir(parents=True)
        ctx = LocalContext(workdir=work, inputs=dict(inputs))
        outputs.append(get_kind(kind).run(params, ctx))
        assert ctx.fractions and ctx.fractions[-1] == pytest.approx(1.0)
    return outputs


def test_there_is_one_example_per_catalog_kind() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} == {n for n, k in all_kinds().items() if not k.test_only}


@pytest.mark.parametrize("name", ["matmul", "sleep", "vector_add", "conv2d", "mlp_train", "benchmark"])
def test_example_validates_and_runs(name: str, tmp_path: Path) -> None:
    [manifest] = load_manifests(EXAMPLES / f"{name}.yaml")
    assert manifest.kind == name
    points = manifest.points()
    outputs = run_points(name, points, tmp_path)
    if name == "matmul":
        assert [o.values["dtype"] for o in outputs] == ["float32", "bfloat16"]
        assert all(o.metrics["gflops"] > 0 for o in outputs)
    elif name == "sleep":
        assert manifest.n_tasks == 1 and outputs[0].values == {"slept": 1.0}
    elif name == "vector_add":
        assert outputs[0].metrics["gb_per_s"] > 0
    elif name == "conv2d":
        assert outputs[0].metrics["images_per_s"] > 0
    elif name == "mlp_train":
        assert len(outputs) == 2
        for out in outputs:
            curve = out.values["loss_curve"]
            assert len(curve) == 5 and curve[-1] < curve[0]
            assert out.files["weights"].stat().st_size > 0
        # its spec.report names a value the kind really returns: the board can rank the sweep's tasks
        assert manifest.report is not None
        assert all(metric_value({"values": o.values}, manifest.report.metric) is not None for o in outputs)
    elif name == "benchmark":
        assert outputs[0].values["results"][0]["device"] == "cpu"


def test_inference_example_validates_and_runs(tmp_path: Path) -> None:
    path = EXAMPLES / "inference.yaml"
    [manifest] = load_manifests(path)
    inputs = manifest.source["spec"]["inputs"]
    model = path.parent / inputs["model"]
    data = path.parent / inputs["data"]["path"]
    count = inputs["data"]["shard"]["count"]
    total = check_safetensors(data)["x"].shape[0]
    results = []
    for index in range(count):
        start, end = shard_rows(total, count, index)
        params = get_kind("inference").validate({**manifest.params, "row_start": start, "row_end": end})
        [out] = run_points("inference", [params], tmp_path / f"shard-{index}", model=model, data=data)
        results.append(load_file(str(out.files["outputs"]))["y"])
    with torch.no_grad():
        want = load_pt2(model).module()(load_file(str(data))["x"])
    assert torch.allclose(torch.cat(results), want, atol=1e-6)


def test_python_example_validates_and_its_cnn_learns_the_shapes(tmp_path: Path) -> None:
    [manifest] = load_manifests(EXAMPLES / "python.yaml")
    assert manifest.kind == "python" and manifest.n_tasks == 6
    assert {tuple(sorted(p)) for p in manifest.points()} == {("batch_size", "epochs", "lr", "samples", "seed",
                                                             "width")}
    bundled, code = bundle_manifest(manifest, tmp_path / "bundle")
    assert code is not None and "code" in bundled.inputs
    # the sweep's best corner, shortened: the held-out accuracy is far above chance (0.25)
    params = {**manifest.points()[-1], "epochs": 2, "samples": 1500}
    [out] = run_points("python", [params], tmp_path, code=code)
    assert out.values["val_acc"] > 0.5 and out.values["parameters"] > 0
    assert out.files["model"].name == "model.safetensors" and set(load_file(str(out.files["model"])))
