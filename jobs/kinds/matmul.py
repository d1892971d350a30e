"""``matmul``: N x N matrix multiply, repeated; reports GFLOPS and a digest of the product."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobs.compare import CompareSpec
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from jobs.kinds.torchutil import DTYPES, Timer, tensor_digest, torch_device, usable_dtype


class Matmul(Kind):
    name = "matmul"
    summary = "N x N matrix multiply; reports GFLOPS (the classic throughput check)"
    #: the product differs in its last bits across CPUs/GPUs: compare the checksum against the sum of |c|
    compare = CompareSpec("tolerant", ignore=("digest",), scaled={"checksum": "abs_sum"})
    params = {
        "size": Param(int, 1024, minimum=1, maximum=32768, doc="matrix side N"),
        "dtype": Param(str, "float32", choices=DTYPES),
        "iterations": Param(int, 10, minimum=1, maximum=100_000),
        "seed": Param(int, 0, minimum=0, maximum=2**63 - 1, doc="seed of the random inputs"),
    }

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        n = params["size"]
        return Cost(flops=2.0 * n**3 * params["iterations"], bytes=3.0 * 4 * n * n)

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        import torch

        out = KindOutput()
        device = torch_device(ctx.device)
        dtype = usable_dtype(params["dtype"], device, out.notes)
        n, iterations = params["size"], params["iterations"]
        gen = torch.Generator().manual_seed(params["seed"])
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        c = a
        step = max(1, iterations // 20)
        with Timer(device) as timer:
            for i in range(iterations):
                c = torch.matmul(a, b)
                if (i + 1) % step == 0:
                    ctx.progress((i + 1) / iterations)
        seconds = max(timer.seconds, 1e-9)
        out.metrics["seconds"] = seconds
        out.metrics["gflops"] = 2.0 * n**3 * iterations / seconds / 1e9
        out.values["digest"] = tensor_digest(c)
        out.values["checksum"] = float(c.double().sum().item())
        out.values["abs_sum"] = float(c.double().abs().sum().item())
        out.values["dtype"] = str(dtype).removeprefix("torch.")
        return out
