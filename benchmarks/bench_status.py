"""How big and how quick the status page's feed is for a fleet: ``/v1/status`` and the live frame.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_status.py [--agents 10000] [--jobs 2000] [--requests 50]``
starts a real board (in this process, real TLS on 127.0.0.1), registers ``--agents`` agents straight on the
board (a mix of CPU boxes and GPUs of 6 to 24 GB, three quarters of them seen recently) and submits ``--jobs``
signed jobs of 5 tasks (a mix of CPU work and GPU work that needs 8, 16 or 48 GB: the last waits for GPUs
nobody has), a few hundred attempts settle, then it measures:

- the snapshot build (``StatusFeed.refresh``): wall time, median of 5;
- ``GET /v1/status`` (the default view every viewer shares): bytes and time per request over TLS;
- searched and paged views (``?agents_q=``, ``?jobs_kind=&jobs_state=``, ``?agents_offset=5000``);
- the live frame (``event: status``) size, and the per-kind table's why-waiting lines.

Output: one JSON object. Numbers depend on the machine and its load: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.client.submitting import make_envelope
from hub.home import HubHome
from hub.server import BoardServer
from hub.status_page import FEED_KEY
from jobs.manifest import Manifest
from jobs.requirements import Capabilities
from security.identity import Identity
from security.tls import server_context

__all__ = ["main"]

CPU = {"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 8, "model": "Bench CPU", "gflops_fp32": 300.0}}


def _caps(i: int) -> Capabilities:
    if i % 3 == 0:
        return Capabilities.from_dict(CPU)
    vram = (6.0, 8.0, 12.0, 16.0, 24.0)[i % 5]
    gpu = {"name": f"Bench GPU {vram:g}GB", "backend": "cuda", "vram_gb": vram, "compute_capability": "8.6",
           "gflops_fp32": 1000.0 * vram}
    return Capabilities.from_dict({**CPU, "gpus": [gpu]})


def _manifest(i: int) -> Manifest:
    spec: dict[str, Any] = {"task": "sleep", "sweep": {"seconds": [0.01] * 5}}
    if i % 4:
        spec["requires"] = {"device": "gpu", "min_vram_gb": (8, 16, 48)[i % 3]}
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": f"bench-{i:05d}"},
                               "spec": spec})


async def _timed_get(session: aiohttp.ClientSession, path: str, n: int) -> dict[str, Any]:
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.get(path, headers={"Accept": "application/json"}) as resp:
            body = await resp.read()
            assert resp.status == 200, (path, resp.status, body[:300])
        times.append(time.perf_counter() - t0)
        size = len(body)
    return {"bytes": size, "ms_median": round(statistics.median(times) * 1000, 2),
            "ms_p90": round(sorted(times)[int(0.9 * len(times))] * 1000, 2)}


async def run(agents: int, jobs: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = HubHome(Path(tmp) / "hub")
        home.init("127.0.0.1", 0)
        config = home.config(bind="127.0.0.1", port=0)
        server = BoardServer(config, home.db_path, server_context(home.cert_path, home.tls_key_path))
        port = await server.start()
        address = home.address(config, port)
        try:
            board = server.board
            t0 = time.perf_counter()
            for start in range(0, agents, 500):
                keys = [Identity.generate().public for _ in range(min(500, agents - start))]
                await asyncio.gather(*(board.register_agent(k, f"bench-{start + i:05d}", _caps(start + i))
                                       for i, k in enumerate(keys)))
            stale = board.clock() - 3600
            for n, agent in enumerate(list(board.view.agents.values())):
                if n % 4 == 3:
                    agent.last_seen = stale           # a quarter went offline
            user = Identity.generate()
            await server.add_submitter(user.public, "bench")
            for i in range(jobs):
                await board.submit(make_envelope(user, _manifest(i)), user.id)
            setup_s = time.perf_counter() - t0
            feed = server.app[FEED_KEY]
            builds = []
            for _ in range(5):
                t = time.perf_counter()
                snap = await feed.refresh()
                builds.append(time.perf_counter() - t)
            assert address.fingerprint
            connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(address.fingerprint)))
            async with aiohttp.ClientSession(address.url, connector=connector) as session:
                views = {name: await _timed_get(session, path, requests) for name, path in (
                    ("default", "/v1/status"),
                    ("agents_search", "/v1/status?agents_q=bench-0999&agents_limit=50&jobs_limit=0"),
                    ("agents_state_page", "/v1/status?agents_state=offline&agents_offset=1000&jobs_limit=0"),
                    ("jobs_search", "/v1/status?jobs_kind=sleep&jobs_state=queued&jobs_q=bench-01&agents_limit=0"),
                    ("agents_page_deep", f"/v1/status?agents_offset={agents // 2}&agents_limit=500&jobs_limit=0"),
                )}
            snap = feed.snapshot or snap
            return {"agents": agents, "jobs": jobs, "tasks": jobs * 5, "setup_s": round(setup_s, 1),
                    "snapshot_build_ms_median": round(statistics.median(builds) * 1000, 1),
                    "frame_bytes": len(snap.frame), "views": views,
                    "kinds": [{k: r[k] for k in ("kind", "jobs", "queued", "waiting_because")}
                              for r in snap.body.get("kinds", [])]}
        finally:
            await server.stop(drain=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.agents, args.jobs, args.requests)), indent=1))


if __name__ == "__main__":
    main()
