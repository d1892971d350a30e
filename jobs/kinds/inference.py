"""``inference``: run a submitted model over a row range (shard) of an input tensor.

The model is input ``model``: a ``torch.export`` archive (``arch: export``, loaded through
:func:`jobs.safeload.load_pt2`) or safetensors weights of a catalog architecture (``arch: mlp``,
sizes from the weights' metadata as :mod:`mlp_train` writes them, or from params). The data is input
``data``, a safetensors file whose tensor ``input_key`` is split along its first dimension; rows
``row_start`` to ``row_end`` (exclusive, -1 = the end; the file's first row is ``data_offset``, nonzero
when the data is one shard blob of a split input, jobs/inputs.py) are read alone (never the whole
file), run in batches and written as tensor ``y`` (or ``y0``, ``y1``, ... for several outputs) of the
output file ``outputs``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from jobs.compare import CompareSpec
from jobs.errors import PermanentError
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from jobs.kinds.mlp_train import ARCH_KEYS, build_mlp
from jobs.kinds.torchutil import DTYPES, synchronize, tensor_summary, torch_device, usable_dtype
from jobs.safeload import TensorInfo, check_safetensors, load_pt2, load_safetensors, read_metadata
from jobs.shardfiles import read_rows

__all__ = ["Inference", "shard_rows"]

_FLOAT = {"F32", "F16", "BF16", "F64"}


def shard_rows(total: int, count: int, index: int) -> tuple[int, int]:
    """Rows [start, end) of shard ``index`` of ``count`` near-equal shards of ``total`` rows.

    What a board uses to expand ``shard: {by: rows, count: N}`` into ``row_start``/``row_end``.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside 0..{count - 1}")
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class Inference(Kind):
    #: the outputs file is compared through the signed per-tensor summaries (jobs/compare.py says why)
    compare = CompareSpec("tolerant", tf32=True)   # exported models may hold convolutions (cuDNN TF32)
    name = "inference"
    summary = "run a torch.export (.pt2) or catalog-architecture model over a shard of inputs"
    inputs: ClassVar[Mapping[str, bool]] = {"model": True, "data": True}
    params: ClassVar[Mapping[str, Param]] = {
        "arch": Param(str, "export", choices=("export", "mlp"),
                      doc="export: model is a .pt2 archive; mlp: safetensors weights of the catalog MLP"),
        "input_key": Param(str, "x", doc="name of the input tensor in the data file"),
        "row_start": Param(int, 0, minimum=0, maximum=2**62, doc="first row of this shard"),
        "row_end": Param(int, -1, minimum=-1, maximum=2**62, doc="row after the last one; -1 = the end"),
        "data_offset": Param(int, 0, minimum=0, maximum=2**62,
                             doc="the row the data file starts at: a shard blob's first row (set by the board)"),
        "batch_size": Param(int, 256, minimum=1, maximum=1 << 20),
        "dtype": Param(str, "float32", choices=DTYPES, doc="compute dtype (mlp only; export keeps its own)"),
        "input_size": Param(int, 0, minimum=0, maximum=65_536, doc="mlp sizes; 0 = from the weights"),
        "hidden_size": Param(int, 0, minimum=0, maximum=65_536),
        "hidden_layers": Param(int, 0, minimum=0, maximum=16),
        "output_size": Param(int, 0, minimum=0, maximum=10_000),
    }

    def check(self, params: dict[str, Any], prefix: str, errors: list[tuple[str, str]]) -> None:
        if params["row_end"] != -1 and params["row_end"] < params["row_start"]:
            errors.append((f"{prefix}.row_end", f"expected -1 or a row >= row_start "
                                                f"({params['row_start']}), got {params['row_end']}"))

    def input_format(self, name: str, params: Mapping[str, Any]) -> str | None:
        return "pt2" if name == "model" and params["arch"] == "export" else "safetensors"

    def check_input(self, name: str, tensors: Mapping[str, TensorInfo], params: Mapping[str, Any]) -> list[str]:
        key = params["input_key"]
        if name != "data":
            return []
        if key not in tensors:
            return [f"data has no tensor {key!r} (has: {', '.join(sorted(tensors)) or 'none'}); "
                    "set params.input_key to the tensor to run over"]
        if not tensors[key].shape:
            return [f"data tensor {key!r} is a scalar; rows need at least one dimension"]
        return []

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        rows = max(params["row_end"] - params["row_start"], 1) if params["row_end"] >= 0 else 1
        sizes = [params[k] or 64 for k in ARCH_KEYS]
        return Cost(flops=2.0 * rows * (sizes[0] * sizes[1] + sizes[1] * sizes[1] * max(sizes[2] - 1, 0)
                                        + sizes[1] * sizes[3]),
                    bytes=4.0 * rows * (sizes[0] + sizes[3]))

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        out = KindOutput()
        device = torch_device(ctx.device)
        data_path, model_path = ctx.inputs["data"], ctx.inputs["model"]
        info = check_safetensors(data_path)
        key = params["input_key"]
        problems = self.check_input("data", info, params)
        if problems:
            raise PermanentError(problems[0])
        offset = params["data_offset"]   # a shard blob holds rows offset.. of the whole input
        total = offset + info[key].shape[0]
        start = params["row_start"]
        end = total if params["row_end"] == -1 else params["row_end"]
        if end > total or start > total or start < offset:
            held = f"rows {offset}..{total} of this shard" if offset else f"{total} rows"
            raise PermanentError(f"rows {start}..{end} are outside the {held} of {key!r}")
        if start == end:
            raise PermanentError(f"the shard {start}..{end} holds no rows")
        x = read_rows(data_path, key, start - offset, end - offset)
        if params["arch"] == "mlp":
            model, dtype = self._mlp(params, model_path, device, out)
            if info[key].dtype in _FLOAT:
                x = x.to(dtype)
        else:
            model = load_pt2(model_path).module()
            model.to(device)
        outputs = self._run_batches(model, x, params["batch_size"], device, ctx, out)
        names = ["y"] if len(outputs) == 1 else [f"y{i}" for i in range(len(outputs))]
        result = {n: t for n, t in zip(names, outputs, strict=True)}
        path = ctx.workdir / "outputs.safetensors"
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in result.items()}, str(path),
                  {"row_start": str(start), "row_end": str(end), "input_key": key})
        out.files["outputs"] = path
        out.values.update(row_start=start, row_end=end, rows=end - start,
                          outputs={n: list(t.shape) for n, t in result.items()},
                          summaries={n: tensor_summary(t) for n, t in result.items()})
        return out

    def _mlp(self, params: Mapping[str, Any], path: Any, device: Any, out: KindOutput) -> tuple[Any, Any]:
        meta = read_metadata(path)
        arch: dict[str, int] = {}
        for k in ARCH_KEYS:
            given = params[k]
            stored = meta.get(k)
            if given and stored and int(stored) != given:
                raise PermanentError(f"weights are for {k}={stored} but params say {given}")
            if not (given or stored):
                raise PermanentError(f"mlp size {k} is neither in params nor in the weights' metadata")
            arch[k] = int(given or stored or 0)
        model = build_mlp(arch)
        try:
            model.load_state_dict(load_safetensors(path))
        except RuntimeError as exc:
            raise PermanentError(f"weights do not fit mlp {arch}: {exc}") from exc
        dtype = usable_dtype(params["dtype"], device, out.notes)
        model.to(device=device, dtype=dtype).eval()
        return model, dtype

    def _run_batches(self, model: Any, x: Any, batch: int, device: Any, ctx: RunContext,
                     out: KindOutput) -> list[Any]:
        import torch

        rows = x.shape[0]
        chunks: list[list[Any]] = []
        done = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            while done < rows:
                xb = x[done:done + batch].to(device)
                try:
                    y = model(xb)
                except torch.OutOfMemoryError:
                    if batch == 1:
                        raise
                    batch = max(1, batch // 2)
                    out.notes.append(f"out of device memory: batch_size lowered to {batch}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                except Exception as exc:  # shape/dtype mismatches surface as many error types
                    raise PermanentError(f"the model failed on rows {done}..{done + len(xb)}: {exc}") from exc
                ys = list(y) if isinstance(y, tuple | list) else [y]
                chunks.append([t.detach().to("cpu") for t in ys])
                done += len(xb)
                ctx.progress(done / rows)
        synchronize(device)
        seconds = max(time.perf_counter() - t0, 1e-9)
        out.metrics["seconds"] = seconds
        out.metrics["rows_per_s"] = rows / seconds
        if not chunks:
            raise PermanentError("the shard holds no rows")
        return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
