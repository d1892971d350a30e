"""``panal bench device``: each kind on each device here, the engine's overhead, and a chart.

Figures: per-kind wall time per device (and GPU speedup over CPU where there is a GPU), per-task
engine overhead of a warm worker versus calling the kind directly for a ~1 s matmul, warm-worker
task start-up (a ``sleep 0`` round trip) and cold start-up (a fresh worker process: interpreter +
torch import). Writes a PNG bar chart; on a CPU-only machine the chart has the CPU bars only.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.engine.runner import TaskRequest, Worker

__all__ = ["run_device_bench"]

SMALL: dict[str, dict[str, Any]] = {
    "matmul": {"size": 512, "iterations": 10},
    "vector_add": {},
    "conv2d": {},
    "mlp_train": {"epochs": 2},
}


def _devices() -> list[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _matmul_size_for(seconds: float) -> tuple[int, int]:
    """A matmul (size, iterations) that takes about ``seconds`` on this CPU."""
    import torch

    n = 1024
    a = torch.randn(n, n)
    torch.matmul(a, a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, a)
    per = (time.perf_counter() - t0) / 3
    return n, max(1, int(seconds / max(per, 1e-6)))


def _direct(size: int, iterations: int) -> float:
    """The same matmul task run in-process, with no engine around it."""
    from jobs.catalog import get_kind

    class Ctx:
        device, threads, workdir, devices = "cpu", 1, Path(tempfile.gettempdir()), ("cpu",)
        inputs: Mapping[str, Path] = {}

        def progress(self, fraction: float) -> None: ...

        def checkpoint(self, path: Path) -> None: ...

    kind = get_kind("matmul")
    params = kind.validate({"size": size, "iterations": iterations})
    t0 = time.perf_counter()
    kind.run(params, Ctx())
    return time.perf_counter() - t0


async def _bench(workdir: Path, repeats: int) -> dict[str, Any]:
    import torch

    from jobs.catalog import get_kind

    threads = torch.get_num_threads()
    out: dict[str, Any] = {"threads": threads}
    # Cold start: a fresh worker process (interpreter + torch import) until it is ready.
    cold = []
    for _ in range(3):
        w = Worker({"PANAL_WORKER_PRELOAD": "1"})
        t0 = time.perf_counter()
        await w.start()
        cold.append(time.perf_counter() - t0)
        await w.close()
    out["cold_start_ms"] = round(statistics.median(cold) * 1000, 1)
    worker = Worker({"PANAL_WORKER_PRELOAD": "1"})
    await worker.start()
    try:
        # Warm start: a sleep-0 task round trip through a warm worker.
        warm = []
        for i in range(20):
            t0 = time.perf_counter()
            outcome = await worker.run(TaskRequest("sleep", {"seconds": 0}, 10, str(workdir / f"s{i}"),
                                                   threads=threads))
            assert outcome.ok, outcome.error
            warm.append(time.perf_counter() - t0)
        out["warm_task_roundtrip_ms"] = round(statistics.median(warm) * 1000, 2)
        # Engine overhead for a ~1 s matmul: through the warm worker vs in-process.
        size, iterations = _matmul_size_for(1.0)
        engine, direct = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            outcome = await worker.run(TaskRequest("matmul", {"size": size, "iterations": iterations}, 120,
                                                   str(workdir / f"m{i}"), threads=threads))
            engine.append(time.perf_counter() - t0)
            assert outcome.ok, outcome.error
            direct.append(_direct(size, iterations))
        e, d = statistics.median(engine), statistics.median(direct)
        out["matmul_1s"] = {"size": size, "iterations": iterations, "engine_s": round(e, 4),
                            "direct_s": round(d, 4), "overhead_pct": round(100 * (e - d) / d, 2)}
        # Each kind on each device.
        table = []
        for kind_name, params in SMALL.items():
            get_kind(kind_name).validate(params)
            row: dict[str, Any] = {"kind": kind_name}
            for device in _devices():
                t0 = time.perf_counter()
                outcome = await worker.run(TaskRequest(kind_name, params, 300, str(workdir / f"{kind_name}-{device}"),
                                                       device=device, threads=threads))
                row[device] = round(time.perf_counter() - t0, 4) if outcome.ok else f"failed: {outcome.error}"
            if len(row) > 2 and isinstance(row.get("cpu"), float):
                row["speedup"] = {d: round(row["cpu"] / v, 2) for d, v in row.items()
                                  if d not in ("kind", "cpu") and isinstance(v, float) and v > 0}
            table.append(row)
        out["kinds"] = table
    finally:
        await worker.close()
    return out


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["kinds"]
    devices = [d for d in rows[0] if d not in ("kind", "speedup")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(devices))
    for j, device in enumerate(devices):
        values = [r[device] if isinstance(r[device], float) else 0.0 for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], values, width, label=device)
    ax.set_xticks([i + width * (len(devices) - 1) / 2 for i in range(len(rows))], [r["kind"] for r in rows])
    ax.set_ylabel("wall time per task (s, lower is better)")
    ax.set_title("panal bench device" + ("" if len(devices) > 1 else " (no GPU on this machine)"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_device_bench(chart: Path, repeats: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="panal-bench-device-") as tmp:
        result = asyncio.run(_bench(Path(tmp), repeats))
    _chart(result, chart)
    result["chart"] = str(chart)
    return result
