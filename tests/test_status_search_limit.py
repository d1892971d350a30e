"""Costly status queries are rate-limited per source address on a board strangers reach: searches the snapshot's
cache can't answer (each a pass over the whole fleet) and pages of hundreds of rows (each read live). Over real
TLS from real source addresses (127.0.0.x): a stream of distinct texts from one address gets a 429 that says
why and when, while that address's default view and paging, and another address's searches, are served. A
repeated search, another page of one, or a search of a small table is not counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from conftest import InProcessHub
from helpers import scaled
from playwright.async_api import Browser, expect
from status_browser import js_errors, open_page

from hub.ratelimit import source_key
from hub.status_snapshot import FREE_SEARCH_ROWS, Page, Snapshot
from jobs.requirements import Capabilities
from security.identity import Identity

pytestmark = [pytest.mark.timeout(scaled(120))]

STRANGER = "127.0.0.3"
OTHER = "127.0.0.4"


def session_from(hub: InProcessHub, source: str) -> aiohttp.ClientSession:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)),
                                     local_addr=(source, 0))
    return aiohttp.ClientSession(hub.address.url, connector=connector)


async def get(session: aiohttp.ClientSession, query: str) -> tuple[int, dict[str, str], dict[str, object]]:
    async with session.get("/v1/status" + query, headers={"Accept": "application/json"}) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def fleet(hub: InProcessHub, n: int) -> None:
    assert hub.server is not None
    board, caps = hub.server.board, Capabilities.from_dict({"kinds": ["sleep"], "memory_gb": 4})
    for start in range(0, n, 250):
        await asyncio.gather(*(board.register_agent(Identity.generate().public, f"lab-{i:04d}", caps)
                               for i in range(start, min(n, start + 250))))


async def whole_fleet_shown(session: aiohttp.ClientSession, agents: int) -> None:
    """Until the status snapshot a search reads holds every agent (a board this big builds it every interval, in
    the background): paging 50 rows is free, so waiting costs no address its searches."""
    async def shown() -> None:
        while True:
            status, _, page = await get(session, "?agents_limit=50")
            if status == 200 and page["agent_page"]["total"] == agents:   # type: ignore[index]
                return
            await asyncio.sleep(0.05)
    await asyncio.wait_for(shown(), scaled(60))


async def test_distinct_searches_from_one_address_get_a_429_while_others_are_served(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, bind="0.0.0.0", registration="open", status_queries_per_min=1.0,
                       status_query_burst=3)
    await hub.start()
    try:
        await fleet(hub, FREE_SEARCH_ROWS + 1)   # a search of this fleet is a pass worth limiting
        async with session_from(hub, STRANGER) as stranger, session_from(hub, OTHER) as other:
            await whole_fleet_shown(other, FREE_SEARCH_ROWS + 1)   # (a snapshot built mid-registration is small)
            for i in range(3):
                assert (await get(stranger, f"?agents_q=nothing-{i}"))[0] == 200
            status, headers, body = await get(stranger, "?agents_q=nothing-3")
            assert (status, body["error"]) == (429, "too_many_queries")
            assert int(headers["Retry-After"]) >= 1 and "big pages from 127.0.0.3" in str(body["message"])
            assert (await get(stranger, "?agents_state=busy"))[0] == 429        # a state filter is a pass too
            assert (await get(stranger, "?jobs_kind=sleep"))[0] == 200          # a small table's: free
            assert (await get(stranger, ""))[0] == 200                          # the default view
            status, _, page = await get(stranger, "?agents_offset=10&agents_limit=50")   # paging, no search
            assert status == 200 and page["agent_page"] == {"offset": 10, "limit": 50, "total": 1001}
            assert (await get(stranger, "?agents_offset=10&agents_limit=500"))[0] == 429   # 500 rows read live
            status, _, found = await get(other, "?agents_q=lab-001")            # another address
            assert status == 200 and found["agent_page"]["total"] == 10
            status, _, big = await get(other, "?agents_limit=500")
            assert status == 200 and len(big["agent_table"]) == 500
    finally:
        await hub.stop()


async def test_the_page_says_why_a_search_was_refused_and_shows_it_once_the_board_allows(tmp_path: Path,
                                                                                        browser: Browser) -> None:
    # one new search every 20 s: the page's second, typed right after its first, is refused with a Retry-After
    hub = InProcessHub(tmp_path, bind="0.0.0.0", registration="open", status_queries_per_min=3.0,
                       status_query_burst=1)
    await hub.start()
    try:
        await fleet(hub, FREE_SEARCH_ROWS + 1)
        async with session_from(hub, OTHER) as other:
            await whole_fleet_shown(other, FREE_SEARCH_ROWS + 1)
        page = await open_page(browser, hub)
        rows, note = page.locator("#agent-table tbody tr"), page.locator("#agents-note")
        await page.locator("#agents-q").fill("lab-0001")
        await expect(rows).to_have_count(1)
        await expect(note).to_be_hidden()
        await page.locator("#agents-q").fill("lab-0002")
        await expect(note).to_be_visible()
        await expect(note).to_contain_text("too many new searches")
        await expect(note).to_contain_text("retry in")
        await page.locator("#agents-q").fill("")                  # back to the stream's page: nothing refused
        await expect(note).to_be_hidden()
        await page.locator("#agents-q").fill("lab-0002")           # the same refusal again, until the board allows
        await expect(note).to_be_visible()
        # asked again when the board said: the note goes and the search that was refused is shown
        await expect(note).to_be_hidden(timeout=45_000)
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("lab-0002")
        assert js_errors(page) == []
    finally:
        await hub.stop()


async def test_a_hub_only_this_machine_reaches_does_not_limit_its_searches(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, status_queries_per_min=1.0, status_query_burst=1)
    await hub.start()
    try:
        await fleet(hub, FREE_SEARCH_ROWS + 1)
        async with session_from(hub, "127.0.0.1") as session:
            for i in range(5):
                assert (await get(session, f"?agents_q=nothing-{i}"))[0] == 200
    finally:
        await hub.stop()


def test_what_counts_a_new_search_of_a_big_table_or_a_big_page_and_not_a_repeat_or_a_small_one() -> None:
    ids = [f"a{i}" for i in range(FREE_SEARCH_ROWS + 1)]
    snap = Snapshot(base={}, agent_ids=ids, job_ids=["j1"], fingerprint=(), built_at=0.0,
                    agent_text=lambda agent_id: agent_id)
    assert snap.costly(Page()) == 0 and snap.costly(Page(agents_offset=50)) == 0   # no search
    assert snap.costly(Page(agents_q="a1")) == 1
    assert len(snap.agents_matching("a1", "")) == 112   # a1, a10-a19, a100-a199, a1000
    assert snap.costly(Page(agents_q="a1")) == 0
    assert snap.costly(Page(agents_q="a1", agents_offset=50, agents_limit=10)) == 0
    assert snap.costly(Page(agents_q="a1", jobs_kind="sleep")) == 0   # one job: a cheap table
    assert snap.costly(Page(agents_q="a2", agents_state="idle", jobs_q="x")) == 1
    small = Snapshot(base={}, agent_ids=ids[:FREE_SEARCH_ROWS], job_ids=[], fingerprint=(), built_at=0.0)
    assert small.costly(Page(agents_q="zz")) == 0
    # rows read live: the page's own 50 + 50 are free, 500 agent rows are not, unless the table is smaller
    assert snap.costly(Page(agents_limit=50, jobs_limit=50)) == 0
    assert snap.costly(Page(agents_limit=500, jobs_limit=0)) == 1
    assert snap.costly(Page(agents_q="a3", agents_limit=500)) == 2
    assert Snapshot(base={}, agent_ids=ids[:90], job_ids=["j1"], fingerprint=(), built_at=0.0).costly(
        Page(agents_limit=500, jobs_limit=500)) == 0


def test_the_search_index_finds_exactly_what_a_walk_of_the_fleet_finds() -> None:
    # names with a line break (the index's separator), repeats, matches at a text's end and across a boundary
    names = ["lab-1", "lab\nx", "", "aa", "aaa", "b a", "LAB-2", "x", "a\n", "ba"]
    ids = [f"id{i}" for i in range(len(names))]
    texts = {i: f"{name} {i}".lower() for i, name in zip(ids, names, strict=True)}
    states = {i: ("idle", "busy", "offline")[n % 3] for n, i in enumerate(ids)}
    snap = Snapshot(base={}, agent_ids=ids, job_ids=[], fingerprint=(), built_at=0.0, agent_states=states,
                    agent_text=texts.__getitem__)
    alphabet = "abl-x 1id9"
    queries = {a + b for a in alphabet for b in ["", *alphabet]} | {"aaa", "a id3", "x id", "1 id0"}
    for q in sorted(queries):
        for state in ("", "busy"):
            walk = [i for i in ids if (not state or states[i] == state) and q in texts[i]]
            assert snap.agents_matching(q, state) == walk, (q, state)


def test_an_ipv6_caller_is_counted_by_its_64_as_one_host_holds_a_whole_64() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7" and source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%eth0") == "fe80::/64" and source_key(None) == "?" and source_key("sock") == "sock"
