"""Each catalog kind runs for real on the CPU with small sizes, and its numbers are checked."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from jobs.catalog import all_kinds, get_kind
from jobs.errors import InvalidParams, PermanentError
from jobs.kinds.budget import fit_count
from jobs.kinds.inference import shard_rows
from jobs.kinds.mlp_train import build_mlp, split_rows
from jobs.safeload import load_pt2, read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_inference_data = _load_script(ROOT / "configs" / "examples" / "data" / "make_inference_data.py")


class Crash(Exception):
    """Stands in for the worker dying mid-task."""


@dataclass
class LocalContext:
    """A RunContext that runs in the test process and records what the kind reports."""

    workdir: Path
    device: str = "cpu"
    threads: int = 1
    inputs: Mapping[str, Path] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)
    crash_after_checkpoints: int | None = None
    fractions: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def checkpoint(self, path: Path) -> None:
        kept = self.workdir / f"stored-{len(self.checkpoints)}.safetensors"
        shutil.copyfile(path, kept)   # what the engine does: store it before returning
        self.checkpoints.append(kept)
        if self.crash_after_checkpoints is not None and len(self.checkpoints) >= self.crash_after_checkpoints:
            raise Crash


def run(kind: str, params: dict[str, Any], tmp_path: Path, **ctx_args: Any) -> tuple[Any, LocalContext]:
    k = get_kind(kind)
    work = tmp_path / f"work-{kind}-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    ctx = LocalContext(workdir=work, **ctx_args)
    torch.set_num_threads(ctx.threads)   # as the engine does: xdist workers must not fight for cores
    return k.run(k.validate(params), ctx), ctx


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_matmul_digest_matches_local_computation(tmp_path: Path) -> None:
    out, ctx = run("matmul", {"size": 48, "iterations": 3, "seed": 7}, tmp_path)
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(48, 48, generator=gen), torch.randn(48, 48, generator=gen)
    assert out.values["digest"] == sha(a @ b)
    assert out.values["checksum"] == pytest.approx(float((a @ b).double().sum()), rel=1e-6)
    assert out.metrics["gflops"] == pytest.approx(2 * 48**3 * 3 / out.metrics["seconds"] / 1e9)
    assert ctx.fractions[-1] == 1.0


def test_vector_add_result_and_bandwidth(tmp_path: Path) -> None:
    out, ctx = run("vector_add", {"size": 10_000, "iterations": 4, "seed": 3}, tmp_path)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(10_000, generator=gen), torch.randn(10_000, generator=gen)
    assert out.values["digest"] == sha(a + b)
    assert out.metrics["bytes"] == 3 * 4 * 10_000 * 4
    assert out.metrics["gb_per_s"] > 0
    assert out.metrics["gb_per_s"] == pytest.approx(out.metrics["bytes"] / out.metrics["seconds"] / 1e9)
    assert ctx.fractions[-1] == 1.0
    cost = get_kind("vector_add").estimate(get_kind("vector_add").validate({"size": 10_000, "iterations": 4}))
    assert cost.bytes == out.metrics["bytes"]


def test_vector_add_half_precision_moves_half_the_bytes(tmp_path: Path) -> None:
    out, _ = run("vector_add", {"size": 4096, "iterations": 2, "dtype": "bfloat16"}, tmp_path)
    assert out.values["dtype"] == "bfloat16"
    assert out.metrics["bytes"] == 3 * 2 * 4096 * 2


def test_conv2d_output_matches_local_stack(tmp_path: Path) -> None:
    params = {"batch": 3, "image_size": 10, "channels": 4, "kernel": 3, "layers": 2, "iterations": 2,
              "seed": 5}
    out, ctx = run("conv2d", params, tmp_path)
    gen = torch.Generator().manual_seed(5)
    y = x = torch.randn(3, 4, 10, 10, generator=gen)
    weights = [torch.randn(4, 4, 3, 3, generator=gen) * (4 * 9) ** -0.5 for _ in range(2)]
    for w in weights:
        y = F.relu(F.conv2d(y, w, padding=1))
    assert x.shape == y.shape
    assert out.values["output_shape"] == [3, 4, 10, 10]
    assert out.values["checksum"] == pytest.approx(float(y.double().sum()), rel=1e-5)
    assert out.metrics["images_per_s"] == pytest.approx(3 * 2 / out.metrics["seconds"])
    flops = 2.0 * 3 * 10 * 10 * 4 * 4 * 9 * 2
    assert out.metrics["gflops"] == pytest.approx(flops * 2 / out.metrics["seconds"] / 1e9)
    assert get_kind("conv2d").estimate(get_kind("conv2d").validate(params)).flops == flops * 2
    assert len(ctx.fractions) == 2


def test_fit_count_shrinks_work_that_would_not_fit_and_says_so() -> None:
    notes: list[str] = []
    cpu = torch.device("cpu")
    assert fit_count(64, 1e6, cpu, notes, "batch", free=1_000_000_000) == 64
    assert notes == []
    assert fit_count(1000, 1e6, cpu, notes, "batch", free=100_000_000) == 70
    assert notes == ["batch 1000 does not fit in 0.1 GiB free on cpu: ran with 70"]
    assert fit_count(5, 1e9, cpu, notes, "batch", free=1000) == 1


MLP = {"input_size": 8, "hidden_size": 32, "hidden_layers": 1, "output_size": 3, "samples": 256,
       "epochs": 12, "batch_size": 32, "lr": 0.01, "seed": 1}


def test_mlp_train_loss_decreases_and_weights_reproduce_accuracy(tmp_path: Path) -> None:
    out, ctx = run("mlp_train", MLP, tmp_path)
    curve = out.values["loss_curve"]
    assert len(curve) == 12
    assert curve[-1] < 0.5 * curve[0]
    assert out.values["train_acc"] > 0.85 and out.values["val_acc"] > 0.75
    assert (out.values["rows"], out.values["val_rows"]) == (231, 25)   # val_fraction 0.1 of 256 held out
    assert ctx.fractions[-1] == 1.0
    weights = out.files["weights"]
    meta = read_metadata(weights)
    assert meta["arch"] == "mlp" and meta["hidden_size"] == "32"
    model = build_mlp({k: int(meta[k]) for k in ("input_size", "hidden_size", "hidden_layers", "output_size")})
    model.load_state_dict(load_file(str(weights)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=gen)).argmax(dim=1)
    train, val = split_rows(256, 0.1, 1)
    assert not set(train.tolist()) & set(val.tolist())
    with torch.no_grad():
        for rows, name in ((train, "train_acc"), (val, "val_acc")):
            accuracy = float((model(x[rows]).argmax(dim=1) == y[rows]).float().mean())
            assert accuracy == pytest.approx(out.values[name])


def test_mlp_train_resumes_from_a_checkpoint_to_the_same_weights(tmp_path: Path) -> None:
    params = {**MLP, "epochs": 4}
    straight, _ = run("mlp_train", params, tmp_path)
    with pytest.raises(Crash):
        run("mlp_train", {**params, "checkpoint_every_s": 1e-9}, tmp_path, crash_after_checkpoints=13)
    crashed = sorted(tmp_path.glob("work-*/stored-12.safetensors"))
    assert len(crashed) == 1
    meta = read_metadata(crashed[0])
    assert (int(meta["epoch"]), int(meta["batch"])) == (1, 5)   # 8 batches per epoch: 13th is epoch 1 batch 5
    resumed, _ = run("mlp_train", {**params, "checkpoint_every_s": 1e-9}, tmp_path,
                     inputs={"checkpoint": crashed[0]})
    assert resumed.values["resumed_from"] == {"epoch": 1, "batch": 5}
    assert resumed.values["loss_curve"] == straight.values["loss_curve"]
    a, b = load_file(str(straight.files["weights"])), load_file(str(resumed.files["weights"]))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_train_refuses_a_checkpoint_of_other_parameters(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        run("mlp_train", {**MLP, "checkpoint_every_s": 1e-9}, tmp_path, crash_after_checkpoints=1)
    ckpt = next(tmp_path.glob("work-*/stored-0.safetensors"))
    with pytest.raises(PermanentError, match=r"other parameters \(lr\)"):
        run("mlp_train", {**MLP, "lr": 0.5}, tmp_path, inputs={"checkpoint": ckpt})


def test_mlp_train_on_a_dataset_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(200, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    data = tmp_path / "data.safetensors"
    save_file({"x": x, "y": y}, str(data))
    params = {**MLP, "input_size": 6, "output_size": 2, "epochs": 15}
    out, _ = run("mlp_train", params, tmp_path, inputs={"data": data})
    assert (out.values["rows"], out.values["val_rows"]) == (180, 20)
    assert out.values["train_acc"] > 0.9 and out.values["val_acc"] > 0.8
    assert any("given dataset" in n for n in out.notes)
    with pytest.raises(PermanentError, match="x has 6 columns but input_size is 5"):
        run("mlp_train", {**params, "input_size": 5}, tmp_path, inputs={"data": data})
    save_file({"x": x, "y": y + 5}, str(data))
    with pytest.raises(PermanentError, match=r"labels span 5\.\.6, outside 0\.\.1"):
        run("mlp_train", params, tmp_path, inputs={"data": data})


def test_mlp_train_reports_val_acc_on_a_second_file_it_never_trains_on(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(240, 6, generator=gen)
    data, held = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    save_file({"x": x[:200], "y": (x[:200, 0] > 0).long()}, str(data))
    # labels the opposite way: a model trained on `data` is wrong on almost all of them
    save_file({"x": x[200:], "y": (x[200:, 0] <= 0).long()}, str(held))
    params = {**MLP, "input_size": 6, "output_size": 2, "epochs": 15}
    out, _ = run("mlp_train", params, tmp_path, inputs={"data": data, "val_data": held})
    assert (out.values["rows"], out.values["val_rows"]) == (200, 40)   # all of data trained on
    assert out.values["train_acc"] > 0.9 and out.values["val_acc"] < 0.2
    alone, _ = run("mlp_train", {**params, "val_fraction": 0.0}, tmp_path, inputs={"data": data})
    assert alone.values["val_acc"] is None and alone.values["val_rows"] == 0
    assert any("val_acc is null" in n for n in alone.notes)


def test_inference_pt2_outputs_equal_the_model_run_locally(tmp_path: Path) -> None:
    model_path, data_path = make_inference_data.make(tmp_path)
    params = {"arch": "export", "row_start": 10, "row_end": 33, "batch_size": 7}
    out, ctx = run("inference", params, tmp_path, inputs={"model": model_path, "data": data_path})
    x = load_file(str(data_path))["x"]
    with torch.no_grad():
        want = load_pt2(model_path).module()(x[10:33])
    got = load_file(str(out.files["outputs"]))
    assert got.keys() == {"y"}
    assert torch.allclose(got["y"], want, atol=1e-6)
    assert read_metadata(out.files["outputs"]) == {"row_start": "10", "row_end": "33", "input_key": "x"}
    assert out.values["rows"] == 23 and out.values["outputs"] == {"y": [23, 3]}
    assert ctx.fractions[-1] == 1.0
    with pytest.raises(PermanentError, match=r"rows 60\.\.70 are outside the 64 rows"):
        run("inference", {"row_start": 60, "row_end": 70}, tmp_path,
            inputs={"model": model_path, "data": data_path})


def test_inference_mlp_weights_from_mlp_train(tmp_path: Path) -> None:
    trained, _ = run("mlp_train", {**MLP, "epochs": 2}, tmp_path)
    weights = trained.files["weights"]
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    data = tmp_path / "x.safetensors"
    save_file({"features": x}, str(data))
    out, _ = run("inference", {"arch": "mlp", "input_key": "features", "batch_size": 16}, tmp_path,
                 inputs={"model": weights, "data": data})
    model = build_mlp({"input_size": 8, "hidden_size": 32, "hidden_layers": 1, "output_size": 3})
    model.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        assert torch.allclose(load_file(str(out.files["outputs"]))["y"], model(x), atol=1e-6)
    with pytest.raises(PermanentError, match="weights are for hidden_size=32 but params say 16"):
        run("inference", {"arch": "mlp", "input_key": "features", "hidden_size": 16}, tmp_path,
            inputs={"model": weights, "data": data})


def test_shard_rows_tile_the_rows() -> None:
    assert [shard_rows(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_rows(2, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="outside"):
        shard_rows(10, 3, 3)


def test_benchmark_reports_each_device(tmp_path: Path) -> None:
    params = {"kind": "matmul", "params": {"size": 32, "iterations": 2}, "repeats": 2}
    out, ctx = run("benchmark", params, tmp_path)
    [result] = out.values["results"]
    assert result["device"] == "cpu" and result["gflops"] > 0
    assert out.metrics["cpu.gflops"] == result["gflops"]
    assert out.values["speedups"] == {}
    assert any("no speedup" in n for n in out.notes)
    assert ctx.fractions[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(ctx.fractions, ctx.fractions[1:], strict=False))


def test_benchmark_fills_in_the_inner_kinds_defaults() -> None:
    params = get_kind("benchmark").validate({"kind": "vector_add", "params": {"size": 100}})
    assert params["params"] == {"size": 100, "dtype": "float32", "iterations": 20, "seed": 0}


@pytest.mark.parametrize(("kind", "params", "path", "message"), [
    ("matmul", {"size": 0}, "spec.params.size", "expected a number >= 1, got 0"),
    ("vector_add", {"size": 2**40}, "spec.params.size", "expected a number <= 2.14748e+09"),
    ("vector_add", {"dtype": "float8"}, "spec.params.dtype", "expected one of float32"),
    ("conv2d", {"kernel": 4}, "spec.params.kernel", "expected one of 1, 3, 5, 7, got 4"),
    ("conv2d", {"batch": "many"}, "spec.params.batch", "expected an integer, got 'many'"),
    ("mlp_train", {"lr": 0}, "spec.params.lr", "expected a number >= 1e-07"),
    ("mlp_train", {"hidden_size": 65536, "hidden_layers": 16}, "spec.params.hidden_size",
     "more than the limit of 200,000,000"),
    ("mlp_train", {"epoch": 3}, "spec.params.epoch", "unknown parameter for kind mlp_train"),
    ("inference", {"row_start": 5, "row_end": 2}, "spec.params.row_end", "expected -1 or a row >= row_start"),
    ("inference", {"arch": "resnet"}, "spec.params.arch", "expected one of export, mlp"),
    ("benchmark", {"kind": "inference"}, "spec.params.kind", "expected one of matmul"),
    ("benchmark", {"params": {"size": -1}}, "spec.params.params.size", "expected a number >= 1"),
])
def test_out_of_bound_params_are_rejected(kind: str, params: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        get_kind(kind).validate(params)
    assert any(p == path and message in m for p, m in info.value.errors), info.value.errors


def test_every_kind_estimates_its_cost() -> None:
    for name, kind in all_kinds().items():
        cost = kind.estimate(kind.validate({}))
        assert cost.flops > 0 or cost.bytes > 0 or cost.seconds > 0 or name == "sleep" or kind.test_only, name
    matmul = get_kind("matmul")
    assert matmul.estimate(matmul.validate({"size": 100, "iterations": 3})).flops == 2 * 100**3 * 3


def test_input_declarations() -> None:
    assert get_kind("inference").inputs == {"model": True, "data": True}
    assert get_kind("mlp_train").inputs == {"data": False, "val_data": False}
    assert get_kind("matmul").inputs == {}


def test_jobs_import_without_torch() -> None:
    code = ("import sys; import jobs.catalog, jobs.manifest, jobs.safeload; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors', 'numpy')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
