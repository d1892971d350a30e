"""What only a CUDA machine can show: the capability report, every kind on the GPU, and a GPU job end to end.

Marked ``gpu``: they skip where there is no CUDA device (a GPU is never required of a contributor or of
CI) and run under ``make gpu-check`` on a machine with one.
"""

from __future__ import annotations

import json
import math
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import Procs, panal

from agent.engine.runner import TaskRequest, Worker
from agent.host.capabilities import detect
from agent.tools.bench_device import SMALL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_capability_report_lists_every_cuda_device_with_its_memory_capability_and_speed(tmp_path: Path) -> None:
    caps = detect(measure=True, cache_path=tmp_path / "bench.json")
    gpus = [g for g in caps["gpus"] if g["backend"] == "cuda"]
    assert len(gpus) == torch.cuda.device_count(), caps
    assert caps["gpu_errors"] == []
    for i, gpu in enumerate(gpus):
        props = torch.cuda.get_device_properties(i)
        assert gpu["name"] == props.name
        assert gpu["vram_gb"] == pytest.approx(props.total_memory / 2**30, rel=0.05)
        assert gpu["compute_capability"] == f"{props.major}.{props.minor}"
        assert gpu["gflops_fp32"] > 0


@pytest.mark.parametrize("kind", sorted(SMALL))
async def test_kind_runs_on_the_gpu_and_reports_the_same_values_as_on_the_cpu(kind: str, tmp_path: Path) -> None:
    worker = Worker({"PANAL_WORKER_PRELOAD": "1"})
    await worker.start()
    try:
        outcomes = {}
        for device in ("cpu", "cuda:0"):
            request = TaskRequest(kind, SMALL[kind], 300, str(tmp_path / device), device=device,
                                  devices=("cpu", "cuda:0"))
            outcomes[device] = await worker.run(request)
            assert outcomes[device].ok, (device, outcomes[device].error)
    finally:
        await worker.close()
    cpu, gpu = outcomes["cpu"].values, outcomes["cuda:0"].values
    assert set(cpu) == set(gpu)
    if kind == "mlp_train":
        return  # training on another device takes another path through float rounding: nothing to compare
    for key, value in cpu.items():
        if isinstance(value, float) and math.isfinite(value):
            # Same seed and data: the numbers agree up to float reassociation on the GPU.
            assert gpu[key] == pytest.approx(value, rel=0.05, abs=1e-3), key


def test_a_job_that_requires_a_gpu_runs_on_it_end_to_end(tmp_path: Path, procs: Procs) -> None:
    home = Path(tempfile.mkdtemp(prefix="pnl-gpu-"))
    manifest = tmp_path / "gpu.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: on-the-gpu}\n"
                        "spec:\n  task: matmul\n  params: {size: 1024, iterations: 20}\n"
                        "  requires: {device: cuda}\n")
    up = procs.start("up", "--port", "0", home=home)
    assert up.stdout is not None
    assert "board at http://127.0.0.1:" in up.stdout.readline(), procs.logs_text()
    [job] = json.loads(panal("submit", str(manifest), "--wait", "--json", home=home, timeout=300).stdout)
    assert job["state"] == "succeeded", job
    res = json.loads(panal("results", job["id"], "--verify", "--json", home=home).stdout)
    [row] = res["results"]
    assert row["verified"]
    assert row["environment"]["gpus"], row   # signed by an agent that has a GPU: only such an agent matches
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
