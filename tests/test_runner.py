"""The execution engine: warm worker processes, time and memory limits, classified failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.engine.runner import TaskRequest, Worker

ENV = {"PANAL_TEST_KINDS": "1", "PANAL_WORKER_PRELOAD": "0"}


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker(ENV)
    await w.start()
    yield w
    await w.close()


def chaos(tmp: Path, mode: str, timeout_s: float = 20, **extra: object) -> TaskRequest:
    return TaskRequest(kind="chaos", params={"mode": mode, **extra}, timeout_s=timeout_s,
                       workdir=str(tmp / mode))


async def test_failures_are_classified_and_the_slot_keeps_serving(worker: Worker, tmp_path: Path) -> None:
    crashed = await worker.run(chaos(tmp_path, "abort"))
    assert (crashed.ok, crashed.error_class) == (False, "crashed") and "SIGABRT" in (crashed.error or "")
    hung = await worker.run(chaos(tmp_path, "hang", timeout_s=1.0))
    assert (hung.ok, hung.error_class) == (False, "timeout") and "time limit of 1 s" in (hung.error or "")
    oom = await worker.run(TaskRequest(kind="chaos", params={"mode": "oom"}, timeout_s=60,
                                       workdir=str(tmp_path / "oom"), max_memory_gb=0.25))
    assert (oom.ok, oom.error_class) == (False, "oom")
    transient = await worker.run(chaos(tmp_path, "transient"))
    permanent = await worker.run(chaos(tmp_path, "permanent"))
    assert (transient.error_class, permanent.error_class) == ("error", "unsupported")
    bad = await worker.run(TaskRequest(kind="chaos", params={"mode": "explode"}, timeout_s=5,
                                       workdir=str(tmp_path / "bad")))
    assert bad.error_class == "invalid_params" and "spec.params.mode" in (bad.error or "")
    unknown = await worker.run(TaskRequest(kind="no-such-kind", params={}, timeout_s=5, workdir=str(tmp_path)))
    assert unknown.error_class == "unsupported"
    ok = await worker.run(chaos(tmp_path, "ok"))
    assert ok.ok and ok.values["mode"] == "ok"


async def test_progress_flows_back_and_matmul_runs_for_real(tmp_path: Path) -> None:
    w = Worker({"PANAL_WORKER_PRELOAD": "1"})
    await w.start()
    assert w.proc is not None
    pid = w.proc.pid
    try:
        seen: list[float] = []
        outcome = await w.run(TaskRequest(kind="matmul", params={"size": 64, "iterations": 40}, timeout_s=60,
                                          workdir=str(tmp_path / "m")), seen.append)
        assert outcome.ok, outcome.error
        import torch

        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
        from jobs.kinds.torchutil import tensor_digest

        assert outcome.values["digest"] == tensor_digest(torch.matmul(a, b))
        assert outcome.metrics["gflops"] > 0 and seen and seen[-1] == 1.0
        warm = await w.run(TaskRequest(kind="sleep", params={"seconds": 0}, timeout_s=10,
                                       workdir=str(tmp_path / "s")))
        assert warm.ok
        # one warm process served both tasks: torch was imported once, at start, not per task
        assert w.proc is not None and w.proc.pid == pid and w.tasks_run == 2
        print(f"sleep(0) on the warm worker took {warm.metrics['wall_s']:.3f} s")
    finally:
        await w.close()


async def test_memory_that_rlimit_data_misses_is_caught_by_the_rss_watch(worker: Worker, tmp_path: Path) -> None:
    # Shared anonymous memory is not counted by RLIMIT_DATA: 1 GB of it under a 0.25 GB cap used to run to the end.
    hog = await worker.run(TaskRequest(kind="chaos", params={"mode": "shared_hog", "mb": 1024}, timeout_s=120,
                                       workdir=str(tmp_path / "hog"), max_memory_gb=0.25))
    assert (hog.ok, hog.error_class) == (False, "oom"), hog
    assert "memory cap of 0.25 GB exceeded" in (hog.error or "")
    # The slot keeps serving, and a task within its cap is left alone.
    small = await worker.run(TaskRequest(kind="chaos", params={"mode": "shared_hog", "mb": 64}, timeout_s=120,
                                         workdir=str(tmp_path / "small"), max_memory_gb=0.25))
    assert small.ok and small.values == {"mode": "shared_hog", "mb": 64}
