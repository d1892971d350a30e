"""``conv2d``: a stack of same-size 2D convolutions (+ReLU) over a batch of images; reports images/s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from jobs.compare import CompareSpec
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from jobs.kinds.budget import fit_count
from jobs.kinds.torchutil import DTYPES, Timer, torch_device, usable_dtype


def conv_flops(params: Mapping[str, Any], batch: int | None = None) -> float:
    """Multiply-adds x 2 of one forward pass over the batch."""
    b = params["batch"] if batch is None else batch
    c, s, k = params["channels"], params["image_size"], params["kernel"]
    return float(2.0 * b * s * s * c * c * k * k * params["layers"])


class Conv2d(Kind):
    name = "conv2d"
    summary = "batched 2D convolutions like a CNN layer stack; reports images/s"
    #: the product differs in its last bits across CPUs/GPUs: compare the checksum against the sum of |c|
    compare = CompareSpec("tolerant", ignore=("digest",), scaled={"checksum": "abs_sum"}, tf32=True)
    params: ClassVar[Mapping[str, Param]] = {
        "batch": Param(int, 32, minimum=1, maximum=4096, doc="images per batch"),
        "image_size": Param(int, 64, minimum=4, maximum=2048, doc="height = width in pixels"),
        "channels": Param(int, 32, minimum=1, maximum=2048, doc="channels in and out of each layer"),
        "kernel": Param(int, 3, choices=(1, 3, 5, 7), doc="kernel side (padding keeps the size)"),
        "layers": Param(int, 4, minimum=1, maximum=64),
        "dtype": Param(str, "float32", choices=DTYPES),
        "iterations": Param(int, 5, minimum=1, maximum=100_000, doc="forward passes over the batch"),
        "seed": Param(int, 0, minimum=0, maximum=2**63 - 1),
    }

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        c, s = params["channels"], params["image_size"]
        return Cost(flops=conv_flops(params) * params["iterations"],
                    bytes=4.0 * params["batch"] * c * s * s * 2 * params["layers"] * params["iterations"])

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        import torch
        import torch.nn.functional as F

        out = KindOutput()
        device = torch_device(ctx.device)
        dtype = usable_dtype(params["dtype"], device, out.notes)
        c, s, k = params["channels"], params["image_size"], params["kernel"]
        item = torch.empty((), dtype=dtype).element_size()
        # input, output and a cuDNN/oneDNN workspace of about the same size, per image
        batch = fit_count(params["batch"], 3.0 * item * c * s * s, device, out.notes, "batch")
        gen = torch.Generator().manual_seed(params["seed"])
        x = torch.randn(batch, c, s, s, generator=gen).to(device=device, dtype=dtype)
        scale = (c * k * k) ** -0.5  # keeps activations O(1) through the stack
        weights = [(torch.randn(c, c, k, k, generator=gen) * scale).to(device=device, dtype=dtype)
                   for _ in range(params["layers"])]
        iterations = params["iterations"]
        y = x
        with torch.inference_mode(), Timer(device) as timer:
            for i in range(iterations):
                y = x
                for w in weights:
                    y = F.relu(F.conv2d(y, w, padding=k // 2))
                ctx.progress((i + 1) / iterations)
        seconds = max(timer.seconds, 1e-9)
        out.metrics["seconds"] = seconds
        out.metrics["images_per_s"] = batch * iterations / seconds
        out.metrics["gflops"] = conv_flops(params, batch) * iterations / seconds / 1e9
        out.values.update(batch=batch, dtype=str(dtype).removeprefix("torch."),
                          checksum=float(y.double().sum().item()), abs_sum=float(y.double().abs().sum().item()),
                          output_shape=list(y.shape))
        return out
