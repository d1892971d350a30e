"""What one distinct status search costs the board: ``?agents_q=`` / ``?jobs_q=`` text nobody asked before.

``PYTHONPATH=. .venv/bin/python benchmarks/status_search.py [--agents 10000] [--jobs 2000] [--queries 200] [--wan]``
builds the fleet of benchmarks/bench_status.py (a real board in this process, real TLS on 127.0.0.1), then:

- **in the loop**: each of ``--queries`` distinct texts searched over the snapshot (``Snapshot.agents_matching``
  / ``jobs_matching``: what a cache miss costs the event loop), median and p90 in ms: texts that match no agent
  and texts that match every agent, beside the walk the search was before its index (a Python step per agent),
  and the snapshot's first text search (it builds the index);
- **over TLS**: ``GET /v1/status?agents_q=<new text>`` from one client, one after another, median ms per
  request and requests a second, against the same request repeated (a cache hit), and how many of the distinct
  ones the board refused (429: the per-address limit of distinct searches, ``status_queries_per_min``).

Output: one JSON object. Compare runs on one machine.
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
from bench_status import _caps, _manifest  # the same fleet and jobs as the status bench

from agent.client.submitting import make_envelope
from hub.home import HubHome
from hub.server import BoardServer
from hub.status_page import FEED_KEY
from security.identity import Identity
from security.tls import server_context

__all__ = ["main"]


def _ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"ms_median": round(statistics.median(ordered) * 1000, 3),
            "ms_p90": round(ordered[int(0.9 * len(ordered))] * 1000, 3)}


async def _gets(session: aiohttp.ClientSession, paths: list[str]) -> dict[str, Any]:
    times, refused = [], 0
    started = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        async with session.get(path, headers={"Accept": "application/json"}) as resp:
            await resp.read()
            refused += resp.status == 429
            assert resp.status in (200, 429), (path, resp.status)
        times.append(time.perf_counter() - t0)
    return {**_ms(times), "per_s": round(len(paths) / (time.perf_counter() - started), 1), "refused": refused}


async def run(agents: int, jobs: int, queries: int, wan: bool, **settings: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = HubHome(Path(tmp) / "hub")
        home.init("127.0.0.1", 0)
        # --wan: bound to every address, as a hub strangers reach (its per-address search limit applies)
        config = home.config(bind="0.0.0.0" if wan else "127.0.0.1", port=0, **settings)
        server = BoardServer(config, home.db_path, server_context(home.cert_path, home.tls_key_path))
        port = await server.start()
        address = home.address(config, port)
        try:
            board = server.board
            for start in range(0, agents, 500):
                keys = [Identity.generate().public for _ in range(min(500, agents - start))]
                await asyncio.gather(*(board.register_agent(k, f"bench-{start + i:05d}", _caps(start + i))
                                       for i, k in enumerate(keys)))
            user = Identity.generate()
            await server.add_submitter(user.public, "bench")
            for i in range(jobs):
                await board.submit(make_envelope(user, _manifest(i)), user.id)
            snap = await server.app[FEED_KEY].refresh()
            texts = [f"q{i}z" for i in range(queries)]   # distinct (never one search twice), matching nothing
            every = sorted({"bench-"[a:b] for a in range(6) for b in range(a + 1, 7)})   # each matches every agent
            loop: dict[str, Any] = {}
            t0 = time.perf_counter()
            snap.agents_matching("first", "")
            loop["agents_first_search_of_a_snapshot_ms"] = round((time.perf_counter() - t0) * 1000, 3)

            def walk(q: str) -> list[str]:   # the search before the index: a Python step per agent
                return [i for i in snap.agent_ids if q in snap.agent_text(i)]

            for name, search, asked in (
                    ("agents_matching_none", lambda q: snap.agents_matching(q, ""), texts),
                    ("agents_matching_none_walk", walk, texts),
                    ("agents_matching_all", lambda q: snap.agents_matching(q, ""), every),
                    ("agents_matching_all_walk", walk, every),
                    ("jobs", lambda q: snap.jobs_matching(q, "", ""), texts)):
                times = []
                for q in asked:
                    t0 = time.perf_counter()
                    search(q)
                    times.append(time.perf_counter() - t0)
                loop[name] = _ms(times)
            assert address.fingerprint
            connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(address.fingerprint)))
            async with aiohttp.ClientSession(address.url, connector=connector) as session:
                repeated = await _gets(session, ["/v1/status?agents_q=bench-0999&jobs_limit=0"] * queries)
                distinct = await _gets(session, [f"/v1/status?agents_q=x{q}&jobs_limit=0" for q in texts])
            return {"agents": agents, "jobs": jobs, "queries": queries, "limited": not config.loopback_only,
                    "one_search_in_the_loop": loop, "http_distinct": distinct, "http_repeated": repeated}
        finally:
            await server.stop(drain=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--wan", action="store_true",
                        help="bind 0.0.0.0 as a hub strangers reach, so the per-address search limit applies")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=NUMBER",
                        help="a hub setting for the run (e.g. status_queries_per_min=0 to lift the limit)")
    args = parser.parse_args()
    settings = {name: float(value) for name, value in (item.split("=", 1) for item in args.set)}
    print(json.dumps(asyncio.run(run(args.agents, args.jobs, args.queries, args.wan, **settings)), indent=1))


if __name__ == "__main__":
    main()
