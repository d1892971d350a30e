"""Single-task submit -> result latency through a real agent process (``panal agent run``), not a simulated one.

`panal bench dispatch` answers tasks in the load generator; this one runs them as a volunteer's agent does:
the assignment's checks, a warm worker process, the signed result through the outbox. Samples alternate
between one request (``POST /v1/jobs?wait=``, ``run_job``) and submit + ``GET ?wait`` (what a checkout without
``run_job`` does for both, so the same script measures a before/after pair).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_real_agent.py --samples 100 --slots 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.client import submitting
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, wait_job
from agent.tools.bench_dispatch import _manifest
from agent.tools.demo import _env, panal_cli, start_hub, stop
from security.identity import Identity
from security.tls import BoardAddress


async def _one_request(client: BoardClient, envelope: dict[str, Any]) -> dict[str, Any]:
    run_job = getattr(submitting, "run_job", None)
    if run_job is None:   # a checkout before POST ?wait
        return await _two_requests(client, envelope)
    job: dict[str, Any] = await run_job(client, envelope, 60.0)
    return job


async def _two_requests(client: BoardClient, envelope: dict[str, Any]) -> dict[str, Any]:
    job = await submit(client, envelope)
    return await wait_job(client, job["id"], 60.0)


async def _measure(url: str, user: Identity, samples: int) -> dict[str, float]:
    ways = {"one_request": _one_request, "submit_then_get": _two_requests}
    latencies: dict[str, list[float]] = {name: [] for name in ways}
    async with BoardClient(BoardAddress.parse(url), user) as client:
        for i in range(10):   # the agent registers, starts its worker, warms up
            job = await _two_requests(client, make_envelope(user, _manifest(1, f"warm-{i}")))
            assert job["state"] == "succeeded", job
        for i in range(2 * samples):
            name = list(ways)[i % 2]
            t0 = time.perf_counter()
            job = await ways[name](client, make_envelope(user, _manifest(1, f"lat-{i}")))
            latencies[name].append((time.perf_counter() - t0) * 1000)
            assert job["state"] == "succeeded", job
    return {f"{name}_ms_p50": round(statistics.median(v), 2) for name, v in latencies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--slots", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="panal-real-agent-") as tmp:
        hub, url = start_hub(Path(tmp) / "hub", Path(tmp) / "user")
        home = Path(tmp) / "agent"
        panal_cli("agent", "join", url, "--name", "bench", home=home)
        agent = subprocess.Popen([sys.executable, "-m", "agent", "agent", "run", "--name", "bench", "--no-lan",
                                  "--slots", str(args.slots)], env=_env(home), stdout=subprocess.DEVNULL, text=True)
        try:
            result = asyncio.run(_measure(url, Identity.load(Path(tmp) / "user" / "user.key"), args.samples))
        finally:
            stop([hub, agent])
            if hub.stdout is not None:
                hub.stdout.close()
    print({"slots": args.slots, "samples": args.samples, **result})


if __name__ == "__main__":
    main()
