"""``vector_add``: element-wise add of large vectors; reports effective memory bandwidth (GB/s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from jobs.compare import CompareSpec
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from jobs.kinds.budget import fit_count
from jobs.kinds.torchutil import DTYPES, Timer, tensor_digest, torch_device, usable_dtype

_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class VectorAdd(Kind):
    name = "vector_add"
    summary = "c = a + b over long vectors; reports memory bandwidth in GB/s"
    #: the product differs in its last bits across CPUs/GPUs: compare the checksum against the sum of |c|
    compare = CompareSpec("tolerant", ignore=("digest",), scaled={"checksum": "abs_sum"})
    params: ClassVar[Mapping[str, Param]] = {
        "size": Param(int, 1 << 24, minimum=1, maximum=1 << 31, doc="elements per vector"),
        "dtype": Param(str, "float32", choices=DTYPES),
        "iterations": Param(int, 20, minimum=1, maximum=100_000),
        "seed": Param(int, 0, minimum=0, maximum=2**63 - 1, doc="seed of the random inputs"),
    }

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        n, it = params["size"], params["iterations"]
        return Cost(flops=float(n * it), bytes=3.0 * _ITEM_BYTES[params["dtype"]] * n * it)

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        import torch

        out = KindOutput()
        device = torch_device(ctx.device)
        dtype = usable_dtype(params["dtype"], device, out.notes)
        item = torch.empty((), dtype=dtype).element_size()
        # a, b, c on the device plus a staging copy while moving a and b there
        n = fit_count(params["size"], 4.0 * item, device, out.notes, "size")
        iterations = params["iterations"]
        gen = torch.Generator().manual_seed(params["seed"])
        a = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        c = torch.empty_like(a)
        step = max(1, iterations // 20)
        with Timer(device) as timer:
            for i in range(iterations):
                torch.add(a, b, out=c)
                if (i + 1) % step == 0:
                    ctx.progress((i + 1) / iterations)
        seconds = max(timer.seconds, 1e-9)
        moved = 3.0 * item * n * iterations
        out.metrics["seconds"] = seconds
        out.metrics["bytes"] = moved
        out.metrics["gb_per_s"] = moved / seconds / 1e9
        out.values.update(size=n, dtype=str(dtype).removeprefix("torch."), digest=tensor_digest(c),
                          checksum=float(c.double().sum().item()), abs_sum=float(c.double().abs().sum().item()))
        return out
