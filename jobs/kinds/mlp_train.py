"""``mlp_train``: train a small MLP classifier with Adam; returns the loss curve, ``train_acc``, ``val_acc``
and the weights.

The data is a synthetic, learnable set made from the seed (inputs ~ N(0, 1), labels the argmax of
a random linear "teacher"), or a safetensors file given as input ``data`` with tensors ``x``
(float, rows x input_size) and ``y`` (integer class per row). ``val_fraction`` of the rows (a split
drawn from the seed) is held out and never trained on; ``val_acc`` is the accuracy on them (or on a
second file, input ``val_data``, when given). Training is deterministic for a given
seed: each epoch's shuffle comes from (seed, epoch), so a run resumed from a checkpoint (written
every ``checkpoint_every_s`` seconds and handed back as input ``checkpoint``) ends with the same
weights as one that never stopped. Checkpoints and weights are safetensors; nothing is pickled.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from jobs.compare import CompareSpec
from jobs.errors import PermanentError
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from jobs.kinds.budget import fit_count, free_bytes
from jobs.kinds.torchutil import synchronize, torch_device
from jobs.safeload import TensorInfo, check_safetensors, load_safetensors, read_metadata

__all__ = ["ARCH_KEYS", "MlpTrain", "build_mlp", "dataset_problems", "mlp_param_count", "split_rows"]

#: the parameters that define the architecture (stored in the weights' metadata).
ARCH_KEYS = ("input_size", "hidden_size", "hidden_layers", "output_size")
# parameters that may differ between a checkpoint and the run resuming from it
_RESUMABLE_CHANGES = {"epochs", "checkpoint_every_s"}
_MAX_PARAMS = 200_000_000


def mlp_param_count(arch: Mapping[str, int]) -> int:
    i, h, n, o = (int(arch[k]) for k in ARCH_KEYS)
    return (i + 1) * h + (n - 1) * (h + 1) * h + (h + 1) * o


def build_mlp(arch: Mapping[str, int], seed: int | None = None) -> Any:
    """The catalog MLP: ``hidden_layers`` x (Linear, ReLU), then Linear to ``output_size``.

    With ``seed``, weights are initialised from it (uniform +-1/sqrt(fan_in), as torch does)
    without touching the global RNG.
    """
    import torch

    sizes = [int(arch["input_size"])] + [int(arch["hidden_size"])] * int(arch["hidden_layers"])
    layers: list[Any] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(sizes[-1], int(arch["output_size"])))
    model = torch.nn.Sequential(*layers)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    bound = 1.0 / layer.in_features ** 0.5
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
                    layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)
    return model


class MlpTrain(Kind):
    #: loss curves and final metrics within 1e-2 (training amplifies rounding differences); weights unchecked
    compare = CompareSpec("tolerant", ignore=("resumed_from",), tolerance=1e-2)
    name = "mlp_train"
    summary = "train a small MLP classifier (Adam); returns loss curve, train_acc, val_acc and weights"
    inputs: ClassVar[Mapping[str, bool]] = {"data": False, "val_data": False}
    params: ClassVar[Mapping[str, Param]] = {
        "input_size": Param(int, 16, minimum=1, maximum=65_536),
        "hidden_size": Param(int, 64, minimum=1, maximum=65_536),
        "hidden_layers": Param(int, 1, minimum=1, maximum=16),
        "output_size": Param(int, 4, minimum=2, maximum=10_000, doc="number of classes"),
        "samples": Param(int, 1024, minimum=1, maximum=10_000_000,
                         doc="rows of the synthetic dataset (ignored with a data input)"),
        "epochs": Param(int, 10, minimum=1, maximum=100_000),
        "batch_size": Param(int, 64, minimum=1, maximum=65_536),
        "lr": Param(float, 1e-3, minimum=1e-7, maximum=10.0, doc="Adam learning rate"),
        "seed": Param(int, 0, minimum=0, maximum=2**62),
        "val_fraction": Param(float, 0.1, minimum=0.0, maximum=0.5,
                              doc="share of the rows held out for val_acc (split from the seed); "
                                  "ignored with a val_data input"),
        "checkpoint_every_s": Param(float, 0.0, minimum=0.0, maximum=86_400.0,
                                    doc="seconds between checkpoints; 0 = none"),
    }

    def check(self, params: dict[str, Any], prefix: str, errors: list[tuple[str, str]]) -> None:
        n = mlp_param_count(params)
        if n > _MAX_PARAMS:
            errors.append((f"{prefix}.hidden_size", f"the model would have {n:,} parameters, "
                                                    f"more than the limit of {_MAX_PARAMS:,}"))

    def input_format(self, name: str, params: Mapping[str, Any]) -> str | None:
        return "safetensors"

    def check_input(self, name: str, tensors: Mapping[str, TensorInfo], params: Mapping[str, Any]) -> list[str]:
        return dataset_problems(tensors, params, "validation dataset" if name == "val_data" else "dataset")

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        weights = mlp_param_count(params)
        rows = params["samples"] * params["epochs"]
        return Cost(flops=6.0 * weights * rows, bytes=4.0 * rows * (params["input_size"] + 1))

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        import torch
        import torch.nn.functional as F

        out = KindOutput()
        device = torch_device(ctx.device)
        x, y = self._dataset(params, ctx, out)
        if "val_data" in ctx.inputs:
            x_val, y_val = self._dataset(params, ctx, out, "val_data")
        else:
            train, val = split_rows(x.shape[0], params["val_fraction"], params["seed"])
            x, y, x_val, y_val = x[train], y[train], x[val], y[val]
        rows = x.shape[0]
        row_bytes = 4.0 * (params["input_size"] + params["hidden_size"] * params["hidden_layers"] * 3
                           + params["output_size"] * 2)
        batch = fit_count(params["batch_size"], row_bytes, device, out.notes, "batch_size")
        free = free_bytes(device)
        if device.type != "cpu" and (free is None or x.numel() * 4 < 0.5 * free):
            x, y = x.to(device), y.to(device)
        model = build_mlp(params, seed=params["seed"]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=params["lr"])
        state: dict[str, Any] = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "curve": []}
        if "checkpoint" in ctx.inputs:
            state = _restore(ctx.inputs["checkpoint"], params, model, opt, device)
            out.values["resumed_from"] = {"epoch": state["epoch"], "batch": state["batch"]}
        per_epoch = (rows + batch - 1) // batch
        total = per_epoch * params["epochs"]
        every = params["checkpoint_every_s"]
        last_save = time.monotonic()
        seen = 0
        t0 = time.perf_counter()
        model.train()
        while state["epoch"] < params["epochs"]:
            gen = torch.Generator().manual_seed((params["seed"] * 1_000_003 + state["epoch"]) % 2**63)
            order = torch.randperm(rows, generator=gen)
            while state["batch"] < per_epoch:
                b = state["batch"]
                idx = order[b * batch:(b + 1) * batch]
                xb, yb = x[idx].to(device), y[idx].to(device)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                state["loss_sum"] += float(loss.item()) * len(idx)
                state["batch"] = b + 1
                seen += len(idx)
                if state["batch"] == per_epoch:
                    state["curve"].append(state["loss_sum"] / rows)
                    state.update(epoch=state["epoch"] + 1, batch=0, loss_sum=0.0)
                done = state["epoch"] * per_epoch + state["batch"]
                ctx.progress(done / total)
                if every and time.monotonic() - last_save >= every and done < total:
                    _save_checkpoint(ctx, params, model, opt, state)
                    last_save = time.monotonic()
                if state["batch"] == 0:
                    break  # next epoch: a new shuffle
        synchronize(device)
        seconds = max(time.perf_counter() - t0, 1e-9)
        model.eval()
        val_acc = _accuracy(model, x_val, y_val, device) if len(y_val) else None
        if val_acc is None:
            out.notes.append("no rows held out for validation: val_acc is null (raise val_fraction)")
        weights = ctx.workdir / "weights.safetensors"
        _save(weights, {k: v for k, v in model.state_dict().items()}, _arch_meta(params))
        out.files["weights"] = weights
        out.values.update(loss_curve=state["curve"], final_loss=state["curve"][-1],
                          train_acc=_accuracy(model, x, y, device), val_acc=val_acc, rows=rows,
                          val_rows=len(y_val), batch_size=batch)
        out.metrics["seconds"] = seconds
        out.metrics["samples_per_s"] = seen / seconds
        return out

    def _dataset(self, params: Mapping[str, Any], ctx: RunContext, out: KindOutput,
                 name: str = "data") -> tuple[Any, Any]:
        import torch

        path = ctx.inputs.get(name)
        if path is None:
            gen = torch.Generator().manual_seed(params["seed"])
            x = torch.randn(params["samples"], params["input_size"], generator=gen)
            teacher = torch.randn(params["input_size"], params["output_size"], generator=gen)
            return x, (x @ teacher).argmax(dim=1)
        what = "validation dataset" if name == "val_data" else "dataset"
        problems = dataset_problems(check_safetensors(path), params, what)
        if problems:
            raise PermanentError(problems[0])
        tensors = load_safetensors(path)
        x, y = tensors["x"].float(), tensors["y"].long()
        if int(y.min()) < 0 or int(y.max()) >= params["output_size"]:
            raise PermanentError(f"{what} labels span {int(y.min())}..{int(y.max())}, outside "
                                 f"0..{params['output_size'] - 1} (output_size)")
        out.notes.append(f"{'validated' if name == 'val_data' else 'trained'} on the given {what} "
                         f"({x.shape[0]} rows){'' if name == 'val_data' else '; samples ignored'}")
        return x, y


def dataset_problems(info: Mapping[str, TensorInfo], params: Mapping[str, Any], what: str = "dataset") -> list[str]:
    """Why a dataset file's header does not fit ``params`` (empty: it fits); checked on the agent before
    loading and by ``panal validate`` before upload (jobs/precheck.py)."""
    if set(info) != {"x", "y"}:
        return [f"{what} must hold exactly tensors x and y, found {sorted(info)}"]
    xi, yi = info["x"], info["y"]
    if xi.dtype not in ("F32", "F16", "BF16", "F64") or len(xi.shape) != 2:
        return [f"{what} x must be a 2-D float tensor, got {xi.dtype} {list(xi.shape)}"]
    if xi.shape[1] != params["input_size"]:
        return [f"{what} x has {xi.shape[1]} columns but input_size is {params['input_size']}"]
    if yi.dtype not in ("I64", "I32", "I16", "I8", "U8") or yi.shape != (xi.shape[0],):
        return [f"{what} y must be 1-D integer labels, one per row of x; got {yi.dtype} "
                f"{list(yi.shape)} for {xi.shape[0]} rows"]
    if xi.shape[0] == 0:
        return [f"{what} is empty"]
    return []


def split_rows(rows: int, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, validation) row indices, each ascending: ``int(rows * fraction)`` rows drawn from the seed
    are held out. The same seed and rows give the same split, so a resumed run trains on the same rows."""
    import torch

    n_val = min(int(rows * fraction), rows - 1)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed((seed * 7919 + 17) % 2**63))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _accuracy(model: Any, x: Any, y: Any, device: Any) -> float:
    """The share of rows whose argmax is their label, in blocks (a large set never sits on the device whole)."""
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(y), 4096):
            logits = model(x[start:start + 4096].to(device))
            correct += int((logits.argmax(dim=1) == y[start:start + 4096].to(device)).sum().item())
    return correct / max(len(y), 1)


def _arch_meta(params: Mapping[str, Any]) -> dict[str, str]:
    return {"arch": "mlp", **{k: str(params[k]) for k in ARCH_KEYS}}


def _save(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


def _save_checkpoint(ctx: RunContext, params: Mapping[str, Any], model: Any, opt: Any,
                     state: dict[str, Any]) -> None:
    import torch

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["loss_sum"] = torch.tensor(state["loss_sum"], dtype=torch.float64)
    meta = {"params": json.dumps({k: v for k, v in params.items() if k not in _RESUMABLE_CHANGES},
                                 sort_keys=True),
            "epoch": str(state["epoch"]), "batch": str(state["batch"]), "curve": json.dumps(state["curve"])}
    path = ctx.workdir / "checkpoint.safetensors"
    _save(path, tensors, meta)
    ctx.checkpoint(path)


def _restore(path: Path, params: Mapping[str, Any], model: Any, opt: Any, device: Any) -> dict[str, Any]:
    meta = read_metadata(path)
    try:
        saved = json.loads(meta["params"])
        state: dict[str, Any] = {"epoch": int(meta["epoch"]), "batch": int(meta["batch"]),
                                 "curve": [float(v) for v in json.loads(meta["curve"])]}
    except (KeyError, ValueError, TypeError) as exc:
        raise PermanentError(f"checkpoint metadata is not an mlp_train checkpoint: {exc}") from exc
    wanted = {k: v for k, v in params.items() if k not in _RESUMABLE_CHANGES}
    if saved != json.loads(json.dumps(wanted, sort_keys=True)):
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise PermanentError(f"checkpoint was made with other parameters ({', '.join(changed)})")
    if state["epoch"] > params["epochs"]:
        raise PermanentError(f"checkpoint is at epoch {state['epoch']}, past epochs={params['epochs']}")
    tensors = load_safetensors(path)
    state["loss_sum"] = float(tensors.pop("loss_sum"))
    try:
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()
                               if k.startswith("model.")})
        for i, p in enumerate(model.parameters()):
            entry = {key.split(".", 2)[2]: v.to(device) if key.split(".", 2)[2] != "step" else v
                     for key, v in tensors.items() if key.startswith(f"adam.{i}.")}
            if entry:
                opt.state[p] = entry
    except (RuntimeError, IndexError) as exc:
        raise PermanentError(f"checkpoint does not fit this model: {exc}") from exc
    return state
