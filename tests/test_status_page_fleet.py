"""The status page for a fleet, in real headless Chromium against a real board over TLS: the agent and job tables
paged and searched by the board (over its snapshot), the per-kind table with why work waits, and the 24-hour
history. The rest of the page (live updates, layout, events, privacy) is in tests/test_status_page.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import InProcessHub
from hub_clients import agent, submitter
from playwright.async_api import Browser, expect
from status_browser import artifacts, js_errors, open_page
from test_status_page import CPU_CAPS, GPU_CAPS, SECRET_PARAM, run_one, sleep_job

from agent.client.submitting import make_envelope, submit
from hub import status_page
from jobs.requirements import Capabilities
from security.identity import Identity


@pytest.fixture(autouse=True)
def fast_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_page, "SNAPSHOT_INTERVAL_S", 0.5)


async def test_agent_table_pages_through_a_large_fleet(hub: InProcessHub, browser: Browser) -> None:
    assert hub.server is not None
    caps = Capabilities.from_dict(CPU_CAPS)
    for i in range(120):
        await hub.server.board.register_agent(Identity.generate().public, f"box-{i:03d}", caps)
    page = await open_page(browser, hub)
    await expect(page.locator("#n-online")).to_have_text("120")
    pager = page.locator("#agent-pager")
    await expect(pager).to_be_visible()
    await expect(page.locator("#agents-range")).to_have_text("1–50 of 120")
    await expect(page.locator("#agent-table tbody tr")).to_have_count(50)
    await expect(page.locator("#agents-prev")).to_be_disabled()
    await page.locator("#agents-next").click()
    await expect(page.locator("#agents-range")).to_have_text("51–100 of 120")
    await expect(page.locator("#agent-table tbody tr").first).to_contain_text("box-050")
    await page.locator("#agents-next").click()
    await expect(page.locator("#agents-range")).to_have_text("101–120 of 120")
    await expect(page.locator("#agent-table tbody tr")).to_have_count(20)
    await expect(page.locator("#agents-next")).to_be_disabled()
    await page.locator("#agents-prev").click()
    await page.locator("#agents-prev").click()
    await expect(page.locator("#agents-range")).to_have_text("1–50 of 120")
    await expect(page.locator("#agent-table tbody tr").first).to_contain_text("box-000")
    assert js_errors(page) == []


async def test_agents_and_jobs_are_found_by_search_and_paged_by_the_board(hub: InProcessHub, browser: Browser) -> None:
    """The search boxes ask the board (server-side, over the snapshot), and the pager pages the matches."""
    assert hub.server is not None
    caps = Capabilities.from_dict(CPU_CAPS)
    for i in range(120):
        await hub.server.board.register_agent(Identity.generate().public, f"box-{i:03d}", caps)
    for i in range(2):
        await hub.server.board.register_agent(Identity.generate().public, f"gpu-lab-{i}", caps)
    sub = await submitter(hub)
    for i in range(52):
        await submit(sub, make_envelope(sub.identity, sleep_job(1, f"sweep-{i:02d}")))
    render = [await submit(sub, make_envelope(sub.identity, sleep_job(1, "render"))) for _ in range(2)]
    page = await open_page(browser, hub)
    await expect(page.locator("#n-online")).to_have_text("122")

    await page.locator("#agents-q").fill("GPU-LAB")
    await expect(page.locator("#agent-table tbody tr")).to_have_count(2)
    await expect(page.locator("#agent-table tbody")).to_contain_text("gpu-lab-1")
    await expect(page.locator("#agent-pager")).to_be_hidden()
    await page.locator("#agents-state").select_option("busy")
    await expect(page.locator("#agent-table tbody")).to_have_text("no agent matches")
    await page.locator("#agents-state").select_option("")
    await page.locator("#agents-q").fill("box-1")                     # box-100 .. box-119
    await expect(page.locator("#agent-table tbody tr")).to_have_count(20)
    await page.locator("#agents-q").fill("box")
    await expect(page.locator("#agents-range")).to_have_text("1–50 of 120")
    await page.locator("#agents-next").dispatch_event("click")
    await expect(page.locator("#agents-range")).to_have_text("51–100 of 120")
    await expect(page.locator("#agent-table tbody tr").first).to_contain_text("box-050")

    await page.locator("#jobs-q").fill("sweep")
    await expect(page.locator("#jobs-range")).to_have_text("1–50 of 52")
    await expect(page.locator("#job-table tbody tr")).to_have_count(50)
    # the button's own click event: a mouse click aimed while the table re-renders on a loaded machine can land
    # beside it (the pager's logic is what is checked here; test_agent_table_pages... clicks with the mouse)
    await page.locator("#jobs-next").dispatch_event("click")
    await expect(page.locator("#jobs-range")).to_have_text("51–52 of 52")
    await expect(page.locator("#job-table tbody tr")).to_have_count(2)
    await page.locator("#jobs-q").fill(render[1]["id"][:20])            # by id
    await expect(page.locator("#job-table tbody tr")).to_have_count(1)
    await expect(page.locator(f"#job-{render[1]['id']}")).to_be_visible()
    await page.locator("#jobs-q").fill("render")
    await expect(page.locator("#job-table tbody tr")).to_have_count(2)
    await page.locator("#jobs-kind").select_option("sleep")
    await expect(page.locator("#job-table tbody tr")).to_have_count(2)
    await page.locator("#jobs-state").select_option("succeeded")
    await expect(page.locator("#job-table tbody")).to_have_text("no job matches")
    # the searches stay applied while the stream updates: a new job that does not match is not listed
    await page.locator("#jobs-state").select_option("")
    await submit(sub, make_envelope(sub.identity, sleep_job(1, "unrelated")))
    await expect(page.locator("#n-jobs")).to_have_text("55")
    await expect(page.locator("#job-table tbody tr")).to_have_count(2)
    assert js_errors(page) == []
    await sub.close()


async def test_kind_table_says_why_work_waits_with_run_times_and_a_day_of_history(hub: InProcessHub, browser: Browser,
                                                                                 tmp_path: Path) -> None:
    a0, id0 = await agent(hub, "gpu-box", GPU_CAPS)
    sub = await submitter(hub)
    await submit(sub, make_envelope(sub.identity, sleep_job(2, "small")))
    for name in ("big", "bigger"):
        big = sleep_job(3, name, requires={"device": "gpu", "min_vram_gb": 16})
        await submit(sub, make_envelope(sub.identity, big))
    for _ in range(2):
        await run_one(a0, id0)                                           # wall_s 36
    page = await open_page(browser, hub)
    row = page.locator("#kind-table tr[data-kind=sleep]")
    await expect(row.locator(".n-queued")).to_have_text("6")
    await expect(row.locator(".n-running")).to_have_text("0")
    await expect(row.locator(".run-times")).to_have_text("36s / 36s")
    await expect(row.locator(".failure-rate")).to_have_text("0.0%")
    await expect(row.locator(".why li")).to_have_text(
        "6 tasks of 2 jobs wait: needs min_vram_gb 16: 0 of 1 connected agents have it (largest: 6.0)")
    await expect(row).to_contain_text("2 active jobs")
    await expect(page.locator("#history-caption")).to_contain_text("Last 24 hours: 2 tasks done, 0 failed attempts")
    await expect(page.locator("#history-caption")).to_contain_text("up to 1 agent connected")
    await page.locator("#history-details summary").click()
    history = page.locator("#history-table tbody tr")
    await expect(history).to_have_count(1)
    await expect(history.locator("td").nth(1)).to_have_text("2")        # done
    await expect(history.locator("td").nth(3)).to_have_text("1")        # agents
    await expect(history.locator("td").nth(4)).to_have_text("6")        # backlog
    await expect(page.locator("#jobs-kind option[value=sleep]")).to_have_count(1)
    html = await page.content()
    assert str(SECRET_PARAM) not in html and id0.public.text() not in html and "127.0.0.1" not in html
    await page.screenshot(path=str(artifacts(tmp_path) / "status-kinds-history.png"), full_page=True)
    assert js_errors(page) == []
    await a0.close()
    await sub.close()
