"""The status views at fleet scale, over real TLS: bounded replies, paged tables, capped live viewers.

Agents are registered straight on the board (the real registration path minus HTTP and signatures), so a
fleet of thousands takes a second, not minutes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import InProcessHub
from helpers import wait_for_async

from hub import status_page
from jobs.requirements import Capabilities
from security.identity import Identity

CAPS = Capabilities.from_dict({"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 200.0}})


@pytest.fixture(autouse=True)
def fast_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_page, "SNAPSHOT_INTERVAL_S", 0.5)


async def enrol(hub: InProcessHub, n: int) -> list[str]:
    assert hub.server is not None
    board = hub.server.board
    ids = []
    for start in range(0, n, 500):
        keys = [Identity.generate().public for _ in range(min(500, n - start))]
        await asyncio.gather(*(board.register_agent(k, f"sim-{start + i:05d}", CAPS) for i, k in enumerate(keys)))
        ids += [k.id for k in keys]
    return ids


@pytest.fixture
async def session(hub: InProcessHub) -> AsyncIterator[aiohttp.ClientSession]:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as s:
        yield s


async def get_status(session: aiohttp.ClientSession, query: str = "") -> tuple[int, dict[str, Any]]:
    async with session.get("/v1/status" + query, headers={"Accept": "application/json"}) as resp:
        text = await resp.text()
        return len(text), json.loads(text)


async def test_status_stays_small_with_thousands_of_agents_and_pages_through_them(
        hub: InProcessHub, session: aiohttp.ClientSession) -> None:
    ids = await enrol(hub, 3000)
    # a board this large is snapshotted by the feed's own task, once per interval, never per request
    assert hub.server is not None
    feed = hub.server.app[status_page.FEED_KEY]
    await wait_for_async(lambda: feed.snapshot is not None and feed.snapshot.base["agents"]["registered"] == 3000,
                         "a snapshot of the whole fleet")
    size, status = await get_status(session)
    # the default view lists one page of agents, not the fleet (all 3000 rows would be ~2 MB)
    assert len(status["agent_table"]) == 50 and status["agent_page"] == {"offset": 0, "limit": 50, "total": 3000}
    assert size < 100_000
    seen: list[str] = []
    for offset in range(0, 3000, 500):
        _, page = await get_status(session, f"?agents_offset={offset}&agents_limit=500&jobs_limit=0")
        assert page["agent_page"] == {"offset": offset, "limit": 500, "total": 3000} and page["job_table"] == []
        seen += [row["id"] for row in page["agent_table"]]
    assert sorted(seen) == sorted(ids)                         # every agent once, across the pages
    _, capped = await get_status(session, "?agents_limit=100000")
    assert len(capped["agent_table"]) == 500                   # a page is at most MAX_PAGE rows
    async with session.get("/v1/status?agents_offset=lots", headers={"Accept": "application/json"}) as resp:
        assert resp.status == 400 and "agents_offset" in (await resp.json())["message"]


async def open_stream(session: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    resp = await session.get("/v1/events")
    assert resp.status == 200
    async for line in resp.content:          # the first status frame: the viewer is counted and served
        if line.startswith(b"data: "):
            break
    return resp


async def test_one_viewer_past_the_cap_gets_503_with_retry_after(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, max_status_viewers=2)
    server = await hub.start()
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    try:
        async with aiohttp.ClientSession(hub.address.url, connector=connector) as session:
            first, second = await open_stream(session), await open_stream(session)
            async with session.get("/v1/events", headers={"Accept": "application/json"}) as refused:
                assert refused.status == 503 and int(refused.headers["Retry-After"]) > 0
                body = await refused.json()
                assert body["error"] == "too_many_viewers" and "at most 2 viewers" in body["message"]
            _, status = await get_status(session)                  # polling still works
            assert status["agents"]["registered"] == 0
            first.close()                                           # a viewer leaves: a seat frees up
            feed = server.app[status_page.FEED_KEY]
            await wait_for_async(lambda: len(feed.subscribers) < 2, "the closed stream to be uncounted")
            third = await open_stream(session)
            third.close()
            second.close()
    finally:
        await hub.stop()
