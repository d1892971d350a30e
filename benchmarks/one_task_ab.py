"""Single-task submit -> result latency of two checkouts' hubs at once, samples interleaved (dev-only, before/after).

On a busy shared machine two runs of `panal bench dispatch` minutes apart differ by more than most changes do.
Here two hubs run side by side, one from each checkout (``--base`` and ``--new``: their source trees, run with
``PYTHONPATH`` set to each), each with its own simulated agent (``panal bench dispatch``'s) and submitter in this
process, and the samples alternate between them, so the machine's noise falls on both alike. Besides the
latencies it reports each hub's own CPU time (user + system) per job, which noise moves far less than latency.
The client side (submitter and agent) is this checkout's code for both.

    PYTHONPATH=. .venv/bin/python benchmarks/one_task_ab.py --base ../panal-main --samples 500

Prints one JSON object: per hub p25/p50/p90 (ms) and ``hub_cpu_ms_per_job``, and ``new/base p50``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from agent import eventloop
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, run_job
from agent.tools.bench_dispatch import SimAgent, _manifest
from agent.tools.demo import _env, panal_cli, stop
from security.identity import Identity
from security.tls import BoardAddress

WARMUP = 20


def start(tmp: Path, label: str, tree: Path) -> tuple[subprocess.Popen[str], str, Identity]:
    """`panal hub init` + `panal hub serve` from ``tree``'s source; the process, its join URL and its user."""
    root, home = tmp / label / "hub", tmp / label / "user"
    panal_cli("hub", "init", "--dir", str(root), "--host", "127.0.0.1", home=home)
    env = {**_env(home), "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "hub", "serve", "--dir", str(root), "--port", "0",
                             "--bind", "127.0.0.1"], env=env, cwd=tree, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving at" not in line:
        proc.kill()
        raise SystemExit(f"the {label} hub did not start: {line!r}")
    return proc, line.split("serving at", 1)[1].split(" (")[0].strip(), Identity.load(home / "user.key")


async def bench(hubs: dict[str, tuple[subprocess.Popen[str], str, Identity]], samples: int) -> dict[str, Any]:
    sides: dict[str, tuple[BoardClient, Identity, SimAgent, asyncio.Event, asyncio.Task[None], list[float]]] = {}
    for label, (_, url, user) in hubs.items():
        address = BoardAddress.parse(url)
        agent = SimAgent(address, 1)
        await agent.register()
        stop_at = asyncio.Event()
        sides[label] = (BoardClient(address, user, retry_for_s=30.0), user, agent, stop_at,
                        asyncio.create_task(agent.run(stop_at)), [])
    await asyncio.sleep(0.3)
    cpu0: dict[str, float] = {}
    for i in range(WARMUP + samples):
        if i == WARMUP:
            cpu0 = {label: sum(psutil.Process(proc.pid).cpu_times()[:2]) for label, (proc, _, _) in hubs.items()}
        for label, (submitter, user, _, _, _, latencies) in sides.items():
            envelope = make_envelope(user, _manifest(1, f"{label}-{i}"))
            t0 = time.perf_counter()
            final = await run_job(submitter, envelope, 30.0)
            if final["state"] != "succeeded":
                raise SystemExit(f"{label}: a job ended {final['state']}")
            if i >= WARMUP:
                latencies.append((time.perf_counter() - t0) * 1000)
    out: dict[str, Any] = {}
    for label, (submitter, _, agent, stop_at, runner, latencies) in sides.items():
        cpu_s = sum(psutil.Process(hubs[label][0].pid).cpu_times()[:2]) - cpu0[label]
        stop_at.set()
        await runner
        await agent.client.close()
        await submitter.close()
        latencies.sort()
        out[label] = {"p25": round(latencies[len(latencies) // 4], 3), "p50": round(statistics.median(latencies), 3),
                      "p90": round(latencies[int(len(latencies) * 0.9)], 3),
                      "hub_cpu_ms_per_job": round(cpu_s * 1000 / samples, 3)}
    out["new/base p50"] = round(out["new"]["p50"] / out["base"]["p50"], 3)
    out["new/base hub cpu"] = round(out["new"]["hub_cpu_ms_per_job"] / out["base"]["hub_cpu_ms_per_job"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare against (its root)")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="panal-ab-") as tmp:
        hubs = {"base": start(Path(tmp), "base", args.base.resolve()),
                "new": start(Path(tmp), "new", args.new.resolve())}
        try:
            print(json.dumps(eventloop.run(bench(hubs, args.samples))))
        finally:
            stop([proc for proc, _, _ in hubs.values()])


if __name__ == "__main__":
    main()
