"""The status page in real headless Chromium (``tests/status_browser.py``) against a real board over TLS, and
its live APIs. The page for a fleet (paged and searched tables, the per-kind table, a day's history) is in
tests/test_status_page_fleet.py."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import InProcessHub
from hub_clients import agent, submitter
from playwright.async_api import Browser, expect
from status_browser import artifacts, js_errors, open_page

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub import status_page
from jobs.manifest import Manifest
from security.identity import Identity
from security.records import SignedRecord

SECRET_PARAM = 0.0123457   # a manifest parameter the public page must never show
GTX = {"name": "NVIDIA GeForce GTX 1060 6GB", "backend": "cuda", "vram_gb": 6.0, "vendor": "nvidia",
       "compute_capability": "6.1", "gflops_fp32": 3800.0, "gflops_fp16": 60.0}
CPU_CAPS = {"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 4, "model": "Test CPU", "gflops_fp32": 200.0}}
GPU_CAPS = {**CPU_CAPS, "gpus": [GTX]}


@pytest.fixture(autouse=True)
def fast_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_page, "SNAPSHOT_INTERVAL_S", 0.5)


def sleep_job(n: int, name: str = "sweep", **spec: Any) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": [SECRET_PARAM] * n}, **spec}})


async def run_one(client: BoardClient, ident: Identity, status: str = "ok",
                  values: dict[str, Any] | None = None) -> str:
    [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
    record = SignedRecord.sign(ident, {"task_id": task["task_id"], "job_id": task["job_id"],
                                       "lease_id": task["lease_id"], "attempt": task["attempt"],
                                       "agent_id": ident.id, "status": status, "values": values or {},
                                       "metrics": {"wall_s": 36.0}}).to_wire()
    await client.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    return str(task["task_id"])


async def test_page_shows_fleet_and_follows_a_job_live(hub: InProcessHub, browser: Browser, tmp_path: Path) -> None:
    a0, id0 = await agent(hub, "gpu-box", GPU_CAPS)
    a1, id1 = await agent(hub, "cpu-box", CPU_CAPS)
    page = await open_page(browser, hub)
    await expect(page.locator("#n-online")).to_have_text("2")
    await expect(page.locator("#agent-table tbody tr")).to_have_count(2)
    await expect(page.locator("#agent-table")).to_contain_text("GeForce GTX 1060")
    await expect(page.locator("#agent-table")).to_contain_text("CPU 4 cores")
    await expect(page.locator("#gpus")).to_contain_text("1 × NVIDIA GeForce GTX 1060 6GB")
    await expect(page.locator("#n-compute")).to_have_text("4.20")     # 3800 + 200 + 200 GFLOPS
    await expect(page.locator("#compute-unit")).to_have_text("TFLOPS online")
    await expect(page.locator("#event-list")).to_contain_text("agent gpu-box joined")

    sub = await submitter(hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_job(2)))
    row = page.locator(f"#job-{job['id']}")
    await expect(row).to_have_attribute("data-state", "queued")      # no reload: it came over the stream
    await expect(row).to_contain_text("0/2")
    await expect(page.locator("#event-list")).to_contain_text("job sweep submitted (2 tasks)")
    assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1

    await run_one(a0, id0)
    await expect(row).to_have_attribute("data-state", "running")
    await expect(row).to_contain_text("1/2")
    await expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "50")
    await expect(page.locator("#n-done")).to_have_text("1")

    await row.locator("button").click()                              # the job's task table
    detail = page.locator("#job-detail")
    await expect(detail).to_be_visible()
    await expect(detail.locator("tbody tr")).to_have_count(2)
    await expect(detail.locator("tbody tr[data-state=done]")).to_have_count(1)
    await expect(detail.locator("tbody tr[data-state=done]")).to_contain_text("gpu-box")

    await run_one(a1, id1)
    await expect(row).to_have_attribute("data-state", "succeeded")
    await expect(row).to_contain_text("2/2")
    await expect(detail.locator("tbody tr[data-state=done]")).to_have_count(2)
    await expect(page.locator("#event-list")).to_contain_text("job sweep finished: succeeded")
    # credit is the task's cost (sleep: its seconds, 0.0123), never the claimed 3800 GFLOPS x 36 s of wall time;
    # the throughput chart counted both tasks
    await expect(page.locator("#agent-table tr", has_text="gpu-box")).to_contain_text("0.01")
    await expect(page.locator("#agent-table tr", has_text="gpu-box")).not_to_contain_text("38.00")
    await expect(page.locator("#throughput-caption")).to_contain_text("Last hour: 2 tasks finished")

    # sortable agents table
    name_header = page.locator("#agent-table th[data-key=name]")
    await name_header.locator("button").click()
    await expect(name_header).to_have_attribute("aria-sort", "ascending")
    await expect(page.locator("#agent-table tbody tr").first).to_contain_text("cpu-box")
    await name_header.locator("button").click()
    await expect(name_header).to_have_attribute("aria-sort", "descending")
    await expect(page.locator("#agent-table tbody tr").first).to_contain_text("gpu-box")

    # privacy: no parameters, keys or addresses anywhere in the page
    html = await page.content()
    for secret in (str(SECRET_PARAM), id0.public.text(), id1.public.text(), sub.identity.public.text(),
                   "127.0.0.1", "envelope"):
        assert secret not in html, secret
    out = artifacts(tmp_path)
    await page.screenshot(path=str(out / "status-desktop.png"), full_page=True)
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=str(out / "status-phone.png"), full_page=True)
    assert (out / "status-phone.png").stat().st_size > 10_000
    assert js_errors(page) == []
    for c in (a0, a1, sub):
        await c.close()


async def test_stuck_job_explains_why_it_waits(hub: InProcessHub, browser: Browser) -> None:
    a0, _ = await agent(hub, "gpu-box", GPU_CAPS)
    sub = await submitter(hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_job(1, "big", requires={"device": "gpu",
                                                                                       "min_vram_gb": 16})))
    page = await open_page(browser, hub)
    row = page.locator(f"#job-{job['id']}")
    await expect(row).to_contain_text("(waiting)")
    await row.click()
    await expect(page.locator("#job-waiting li").first).to_contain_text("16")
    await expect(page.locator("#job-detail tbody tr[data-state=queued]")).to_have_count(1)
    await a0.close()
    await sub.close()


async def test_disconnected_state_and_recovery(tmp_path: Path, browser: Browser) -> None:
    hub = InProcessHub(tmp_path)
    await hub.start()
    try:
        a0, _ = await agent(hub, "survivor", CPU_CAPS)
        page = await open_page(browser, hub)
        await expect(page.locator("#n-online")).to_have_text("1")
        assert hub.server is not None
        port = hub.server.port
        t0 = time.monotonic()
        await hub.stop()
        assert time.monotonic() - t0 < 10   # open event streams do not hold the shutdown
        conn = page.locator("#conn")
        await expect(conn).to_have_attribute("data-state", "down", timeout=10_000)
        await expect(conn).to_contain_text("disconnected, retrying")
        hub.settings["port"] = port
        await hub.start()                    # same port, same database
        await expect(conn).to_have_attribute("data-state", "live", timeout=20_000)
        await expect(conn).to_have_text("live")
        await expect(page.locator("#agent-table")).to_contain_text("survivor")
        await a0.close()
    finally:
        await hub.stop()


async def test_phone_width_dark_mode_has_no_horizontal_scroll(hub: InProcessHub, browser: Browser,
                                                              tmp_path: Path) -> None:
    long_name = "a-very-long-volunteer-machine-name-without-any-spaces-0123456789"
    clients = [(await agent(hub, long_name[:60 - i], GPU_CAPS))[0] for i in range(3)]
    sub = await submitter(hub)
    await submit(sub, make_envelope(sub.identity, sleep_job(3, "a-job-with-a-long-name-that-must-wrap-somewhere")))
    page = await open_page(browser, hub, width=360, height=740, color_scheme="dark")
    await expect(page.locator("#job-table tbody tr")).to_have_count(1)
    await expect(page.locator("#agent-table tbody tr")).to_have_count(3)
    overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"page scrolls sideways by {overflow}px at phone width"
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(18, 20, 23)", background      # the dark palette
    # landmarks and labels
    assert await page.locator("main").count() == 1 and await page.locator("header").count() == 1
    assert await page.locator("section[aria-labelledby]").count() >= 4
    assert await page.locator("#conn[role=status]").count() == 1
    await page.screenshot(path=str(artifacts(tmp_path) / "status-phone-dark.png"), full_page=True)
    for c in [*clients, sub]:
        await c.close()


async def test_running_now_lists_an_agents_tasks_without_stray_commas(hub: InProcessHub, browser: Browser) -> None:
    one, _ = await agent(hub, "one-task", CPU_CAPS)
    two, _ = await agent(hub, "two-tasks", CPU_CAPS)
    sub = await submitter(hub)
    await submit(sub, make_envelope(sub.identity, sleep_job(3, "page-watch")))
    assert len((await one.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]) == 1
    assert len((await two.call("POST", "/v1/lease", {"slots": 2, "wait_s": 2}))["tasks"]) == 2
    page = await open_page(browser, hub)
    running = page.locator("#fleet-map li[data-state=busy]")
    await expect(running).to_have_count(2)
    await expect(running.filter(has_text="one-task")).to_have_text(
        re.compile(r"busy\s*page-watch #\d \(0%\)$"), use_inner_text=True)
    await expect(running.filter(has_text="two-tasks")).to_have_text(
        re.compile(r"busy\s*page-watch #\d \(0%\), page-watch #\d \(0%\)$"), use_inner_text=True)
    for c in (one, two, sub):
        await c.close()


async def test_work_cards_keep_counting_tasks_of_finished_jobs(hub: InProcessHub, browser: Browser) -> None:
    a0, id0 = await agent(hub, "worker", CPU_CAPS)
    sub = await submitter(hub)
    page = await open_page(browser, hub)
    done = await submit(sub, make_envelope(sub.identity, sleep_job(2, "finishes")))
    await run_one(a0, id0)
    await run_one(a0, id0)
    await expect(page.locator(f"#job-{done['id']}")).to_have_attribute("data-state", "succeeded")
    failed = await submit(sub, make_envelope(sub.identity, sleep_job(2, "fails", policy={"retries": 0})))
    await run_one(a0, id0)
    await run_one(a0, id0, status="failed")
    failed_row = page.locator(f"#job-{failed['id']}")
    await expect(failed_row).to_have_attribute("data-state", "failed")
    await expect(failed_row).to_contain_text("1/2, 1 failed")
    await expect(page.locator("#n-done")).to_have_text("3")
    await expect(page.locator("#n-failed")).to_have_text("1")
    await expect(page.locator("#n-queued")).to_have_text("0")
    await expect(page.locator("#n-jobs")).to_have_text("0")
    for c in (a0, sub):
        await c.close()


async def test_events_name_a_job_by_name_with_its_id_as_detail_and_count_in_words(hub: InProcessHub,
                                                                               browser: Browser) -> None:
    a0, id0 = await agent(hub, "worker", CPU_CAPS)
    sub = await submitter(hub)
    page = await open_page(browser, hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_job(1, "single")))
    await run_one(a0, id0)
    events = page.locator("#event-list li")
    submitted, finished = events.filter(has_text="submitted"), events.filter(has_text="finished")
    await expect(submitted).to_contain_text("job single submitted (1 task)")
    await expect(submitted).not_to_contain_text("1 tasks")
    await expect(finished).to_contain_text("job single finished: succeeded")
    for line in (submitted, finished):
        await expect(line.locator("code")).to_have_attribute("title", job["id"])
    await expect(page.locator("#throughput-caption")).to_contain_text("Last hour: 1 task finished, 0 failed attempts")
    for c in (a0, sub):
        await c.close()


async def test_compute_card_shows_a_cpu_fleets_measured_speed(hub: InProcessHub, browser: Browser) -> None:
    slow_cpu = {**CPU_CAPS, "cpu": {"cores": 2, "model": "Slow CPU", "gflops_fp32": 1.5}}
    clients = [(await agent(hub, f"cpu-{i}", slow_cpu))[0] for i in range(2)]
    page = await open_page(browser, hub)
    await expect(page.locator("#n-online")).to_have_text("2")
    card = page.locator(".card", has=page.locator("#n-compute"))
    await expect(card).to_have_text(re.compile(r"^GFLOPS online\s*3\.00$"), use_inner_text=True)
    unmeasured = {**CPU_CAPS, "cpu": {"cores": 2, "model": "Unbenched", "gflops_fp32": 0.0}}
    clients.append((await agent(hub, "unbenched", unmeasured))[0])
    await expect(page.locator("#n-online")).to_have_text("3")
    await expect(card).to_have_text(re.compile(r"^GFLOPS online\s*3\.00$"), use_inner_text=True)
    for c in clients:
        await c.close()


async def test_compute_card_says_not_measured_rather_than_zero(hub: InProcessHub, browser: Browser) -> None:
    unmeasured = {**CPU_CAPS, "cpu": {"cores": 2, "model": "Unbenched", "gflops_fp32": 0.0}}
    client, _ = await agent(hub, "unbenched", unmeasured)
    page = await open_page(browser, hub)
    await expect(page.locator("#n-online")).to_have_text("1")
    await expect(page.locator("#n-compute")).to_have_text("not measured")
    await client.close()


async def read_events(resp: aiohttp.ClientResponse, want: int) -> list[tuple[str, Any]]:
    frames: list[tuple[str, Any]] = []
    kind = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            frames.append((kind, json.loads(line[6:])))
            if len(frames) >= want:
                break
    return frames


async def test_event_stream_and_public_json_carry_no_secrets(hub: InProcessHub) -> None:
    assert hub.address is not None and hub.address.fingerprint and hub.server is not None
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session:
        async with session.get("/v1/events") as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            [(kind, first)] = await read_events(resp, 1)
            assert kind == "status" and first["agents"]["registered"] == 0
            a0, ident = await agent(hub, "streamed", GPU_CAPS)
            frames = await asyncio.wait_for(read_events(resp, 2), 10)
            board = [data for kind, data in frames if kind == "board"]
            assert board and board[0]["type"] == "agent_joined" and board[0]["agent"] == ident.id
        sub = await submitter(hub)
        job = await submit(sub, make_envelope(sub.identity, sleep_job(2)))
        await run_one(a0, ident)
        async with session.get("/v1/status", headers={"Accept": "application/json"}) as resp:
            status_text = await resp.text()
            status = json.loads(status_text)
        async with session.get(f"/v1/jobs/{job['id']}/public", headers={"Accept": "application/json"}) as resp:
            public_text = await resp.text()
            public = json.loads(public_text)
        async with session.get("/v1/jobs/jnope/public", headers={"Accept": "application/json"}) as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "no_such_job"
        async with session.get("/static/../board.db") as resp:
            assert resp.status == 404
    assert status["agents"] == {"registered": 1, "online": 1, "idle": 1, "busy": 0, "offline": 0, "quarantined": 0}
    assert status["gpus"] == [{"model": GTX["name"], "count": 1}]
    [row] = status["job_table"]
    assert row["tasks"] == {"done": 1, "queued": 1} and row["progress"] == 0.5 and row["eta_s"] is not None
    assert sum(p["done"] for p in status["throughput"]) == 1 and len(status["throughput"]) == 60
    assert [t["state"] for t in public["tasks"]] == ["done", "queued"]
    assert public["tasks"][0]["agent_name"] == "streamed"
    for text in (status_text, public_text):
        # an envelope would come as its record (the board's counters of envelopes sent are public, as in /metrics)
        for secret in (str(SECRET_PARAM), ident.public.text(), sub.identity.public.text(), '"envelope":', "params"):
            assert secret not in text, secret
    await a0.close()
    await sub.close()


async def test_a_jobs_best_task_shows_in_its_row_and_detail_without_its_params(hub: InProcessHub, browser: Browser,
                                                                              tmp_path: Path) -> None:
    """spec.report: the board ranks accepted results; the page shows the best task's index, metric and value
    (live, in the job's row and its task table) and never the params that produced it."""
    a0, id0 = await agent(hub, "gpu-box", GPU_CAPS)
    page = await open_page(browser, hub)
    sub = await submitter(hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_job(3, report={"metric": "val_acc", "mode": "max"})))
    row = page.locator(f"#job-{job['id']}")
    await expect(row).to_have_attribute("data-state", "queued")
    await expect(row.locator(".best")).to_have_count(0)                       # nothing accepted yet
    for val_acc in (0.61, 0.875, 0.7):
        await run_one(a0, id0, values={"val_acc": val_acc})
    await expect(row).to_have_attribute("data-state", "succeeded")
    await expect(row.locator(".best")).to_have_text("best #1: val_acc 0.875 (max)")
    await row.locator("button").click()
    detail = page.locator("#job-detail")
    await expect(detail.locator("#job-best")).to_have_text("best #1: val_acc 0.875 (max)")
    await expect(detail.locator("tbody tr[data-best]")).to_have_count(1)
    await expect(detail.locator("tbody tr[data-best]")).to_have_attribute("data-idx", "1")
    html = await page.content()
    assert str(SECRET_PARAM) not in html and "params" not in html
    for url in (f"v1/jobs/{job['id']}/public", "v1/status"):   # the public JSON the page reads
        text = await page.evaluate("(url) => fetch(url, {headers: {Accept: 'application/json'}}).then(r => r.text())",
                                   url)
        assert '"best":{"unit":1,"metric":"val_acc","mode":"max","value":0.875}' in text.replace(" ", "")
        assert "params" not in text and str(SECRET_PARAM) not in text
    await page.screenshot(path=str(artifacts(tmp_path) / "status-best-task.png"), full_page=True)
    assert js_errors(page) == []
    await a0.close()
    await sub.close()
