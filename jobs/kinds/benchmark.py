"""``benchmark``: run one kind on the CPU and on each other device here; report the speedups.

The GPU-vs-CPU comparison users want to see. Each device runs the kind ``repeats`` times after
one warm-up run and keeps its best time; a speedup is the device's throughput over the CPU's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from jobs.compare import CompareSpec
from jobs.errors import InvalidParams
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext

__all__ = ["THROUGHPUT", "Benchmark"]

#: benchmarkable kinds and the metric that measures their throughput (higher is better).
THROUGHPUT = {"matmul": "gflops", "vector_add": "gb_per_s", "conv2d": "images_per_s",
              "mlp_train": "samples_per_s"}


def _inner(name: str) -> Kind:
    from jobs.kinds.conv2d import Conv2d
    from jobs.kinds.matmul import Matmul
    from jobs.kinds.mlp_train import MlpTrain
    from jobs.kinds.vector_add import VectorAdd

    kinds: dict[str, Kind] = {"matmul": Matmul(), "vector_add": VectorAdd(), "conv2d": Conv2d(),
                              "mlp_train": MlpTrain()}
    return kinds[name]


@dataclass
class _OnDevice:
    """The task's context, pointed at one device, its progress mapped into a slice of the whole."""

    parent: RunContext
    device: str
    threads: int
    workdir: Path
    lo: float
    hi: float
    devices: Sequence[str] = field(default_factory=tuple)
    inputs: Mapping[str, Path] = field(default_factory=dict)

    def progress(self, fraction: float) -> None:
        self.parent.progress(self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0))

    def checkpoint(self, path: Path) -> None:
        """Benchmarks are short and never resumed: checkpoints of the inner kind are dropped."""


class Benchmark(Kind):
    #: measurements, not answers: instances are never compared (a quorum only shows the work ran)
    compare = CompareSpec("none")
    name = "benchmark"
    summary = "run a kind on CPU and on each GPU here; report times and speedups"
    params: ClassVar[Mapping[str, Param]] = {
        "kind": Param(str, "matmul", choices=tuple(THROUGHPUT), doc="the kind to benchmark"),
        "params": Param(dict, {}, doc="parameters of that kind (its defaults otherwise)"),
        "repeats": Param(int, 3, minimum=1, maximum=20, doc="timed runs per device (best is kept)"),
        "include_cpu": Param(bool, True, doc="also run on the CPU (the baseline of the speedups)"),
    }

    def check(self, params: dict[str, Any], prefix: str, errors: list[tuple[str, str]]) -> None:
        try:
            params["params"] = _inner(params["kind"]).validate(params["params"], f"{prefix}.params")
        except InvalidParams as exc:
            errors.extend(exc.errors)

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        inner = _inner(params["kind"]).estimate(params["params"])
        runs = 2.0 * (params["repeats"] + 1)  # the CPU and (at least) one device
        return Cost(flops=inner.flops * runs, bytes=inner.bytes * runs, seconds=inner.seconds * runs)

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        kind = _inner(params["kind"])
        metric = THROUGHPUT[kind.name]
        devices = list(dict.fromkeys(getattr(ctx, "devices", None) or [ctx.device]))
        if params["include_cpu"]:
            devices = ["cpu", *(d for d in devices if d != "cpu")]
        out = KindOutput()
        results: list[dict[str, Any]] = []
        runs = len(devices) * (params["repeats"] + 1)
        for d_index, device in enumerate(devices):
            best: KindOutput | None = None
            for r in range(params["repeats"] + 1):
                step = d_index * (params["repeats"] + 1) + r
                work = ctx.workdir / f"bench-{d_index}-{r}"
                work.mkdir(parents=True, exist_ok=True)
                sub = _OnDevice(ctx, device, ctx.threads, work, step / runs, (step + 1) / runs,
                                devices=(device,))
                got = kind.run(params["params"], sub)
                if r > 0 and (best is None or got.metrics[metric] > best.metrics[metric]):
                    best = got  # r == 0 is the warm-up (allocator, kernels, caches)
            assert best is not None
            out.notes.extend(f"{device}: {n}" for n in best.notes if f"{device}: {n}" not in out.notes)
            results.append({"device": device, "seconds": best.metrics["seconds"],
                            metric: best.metrics[metric]})
            out.metrics[f"{device}.seconds"] = best.metrics["seconds"]
            out.metrics[f"{device}.{metric}"] = best.metrics[metric]
        speedups: dict[str, float] = {}
        base = next((res for res in results if res["device"] == "cpu"), None)
        if base is not None:
            for res in results:
                if res["device"] != "cpu":
                    speedups[res["device"]] = res[metric] / max(base[metric], 1e-12)
                    out.metrics[f"speedup.{res['device']}"] = speedups[res["device"]]
        if len(results) == 1:
            out.notes.append(f"only {results[0]['device']} is available here: no speedup to report")
        out.values.update(kind=kind.name, metric=metric, results=results, speedups=speedups)
        return out
