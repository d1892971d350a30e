"""The status views for a fleet, over real TLS: search and paging with bad parameters, the per-kind table
(backlog, running, run times, failure rate, why work waits), and the 24-hour history across a hub restart.
The page itself is driven in Chromium by tests/test_status_page.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import InProcessHub
from helpers import wait_for_async
from hub_clients import agent, submitter

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub import status_page
from hub.records import HistoryBucket
from hub.sqlite_store import SqliteStore
from hub.status_history import BUCKET_S, HISTORY_S, StatusHistory
from hub.status_kinds import WINDOW, KindStats
from hub.status_snapshot import MAX_QUERY
from jobs.manifest import Manifest
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

CPU = {"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 4, "model": "Test CPU", "gflops_fp32": 200.0}}
GTX = {"name": "NVIDIA GeForce GTX 1060 6GB", "backend": "cuda", "vram_gb": 6.0, "vendor": "nvidia",
       "compute_capability": "6.1", "gflops_fp32": 3800.0, "gflops_fp16": 60.0}


@pytest.fixture(autouse=True)
def fast_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_page, "SNAPSHOT_INTERVAL_S", 0.3)


def session_for(hub: InProcessHub) -> aiohttp.ClientSession:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    return aiohttp.ClientSession(hub.address.url, connector=connector)


@pytest.fixture
async def session(hub: InProcessHub) -> AsyncIterator[aiohttp.ClientSession]:
    async with session_for(hub) as s:
        yield s


async def status(session: aiohttp.ClientSession, query: str = "") -> dict[str, Any]:
    async with session.get("/v1/status" + query, headers={"Accept": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def refused(session: aiohttp.ClientSession, query: str) -> str:
    async with session.get("/v1/status" + query, headers={"Accept": "application/json"}) as resp:
        assert resp.status == 400, (query, resp.status, await resp.text())
        body = await resp.json()
        assert body["error"] == "bad_request" or body.get("code") or body["error"]
        return str(body["message"])


def job(n: int, name: str, **spec: Any) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.01] * n}, **spec}})


async def run_one(client: BoardClient, ident: Identity, status_: str = "ok", wall_s: float = 36.0) -> None:
    [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
    record = SignedRecord.sign(ident, {"task_id": task["task_id"], "job_id": task["job_id"],
                                       "lease_id": task["lease_id"], "attempt": task["attempt"],
                                       "agent_id": ident.id, "status": status_, "values": {},
                                       "metrics": {"wall_s": wall_s},
                                       **({"error_class": "error", "error": "boom"} if status_ == "failed" else {})
                                       }).to_wire()
    await client.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})


async def test_bad_status_parameters_get_a_400_that_names_them(hub: InProcessHub,
                                                                session: aiohttp.ClientSession) -> None:
    assert "agents_q" in await refused(session, "?agents_q=" + "x" * (MAX_QUERY + 1))
    assert "busy, idle" in await refused(session, "?agents_state=sleeping")
    assert "jobs_state" in await refused(session, "?jobs_state=everything")
    assert "'secret' is not known" in await refused(session, "?secret=1")
    assert "given 2 times" in await refused(session, "?jobs_q=a&jobs_q=b")
    assert "control characters" in await refused(session, "?jobs_kind=%00sleep")
    assert "jobs_offset" in await refused(session, "?jobs_offset=1e999")
    # odd but harmless text is a search, not an error: no match, never a 500
    for odd in ("%27%3B--", "%F0%9F%98%80", "%25", "a%2Fb"):
        body = await status(session, f"?agents_q={odd}&jobs_q={odd}")
        assert body["agent_table"] == [] and body["job_table"] == []


async def test_agents_and_jobs_are_searched_and_paged_by_the_board(hub: InProcessHub,
                                                                    session: aiohttp.ClientSession) -> None:
    assert hub.server is not None
    caps = Capabilities.from_dict(CPU)
    keys = [Identity.generate().public for _ in range(130)]
    for i, key in enumerate(keys):
        await hub.server.board.register_agent(key, f"lab-{i:03d}" if i < 100 else f"home-{i:03d}", caps)
    sub = await submitter(hub)
    made = [await submit(sub, make_envelope(sub.identity, job(1, f"sweep-{i}"))) for i in range(6)]
    made.append(await submit(sub, make_envelope(sub.identity, job(1, "render"))))
    feed = hub.server.app[status_page.FEED_KEY]
    await wait_for_async(lambda: feed.snapshot is not None and feed.snapshot.base["jobs"]["active"] == 7,
                         "a snapshot with every job")

    homes = await status(session, "?agents_q=HOME-&agents_limit=20")
    assert homes["agent_page"] == {"offset": 0, "limit": 20, "total": 30}
    assert all(row["name"].startswith("home-") for row in homes["agent_table"])
    second = await status(session, "?agents_q=home-&agents_limit=20&agents_offset=20")
    assert len(second["agent_table"]) == 10
    assert {r["id"] for r in homes["agent_table"]}.isdisjoint(r["id"] for r in second["agent_table"])
    by_id = await status(session, f"?agents_q={keys[7].id[:16]}")
    assert [r["name"] for r in by_id["agent_table"]] == ["lab-007"]
    assert (await status(session, "?agents_state=offline"))["agent_page"]["total"] == 0
    assert (await status(session, "?agents_state=idle"))["agent_page"]["total"] == 130

    sweeps = await status(session, "?jobs_q=sweep&jobs_limit=4")
    assert sweeps["job_page"]["total"] == 6 and len(sweeps["job_table"]) == 4
    assert all(r["name"].startswith("sweep-") for r in sweeps["job_table"])
    render = await status(session, f"?jobs_q={made[-1]['id']}")
    assert [r["name"] for r in render["job_table"]] == ["render"]
    assert (await status(session, "?jobs_kind=sleep&jobs_state=queued"))["job_page"]["total"] == 7
    assert (await status(session, "?jobs_kind=train"))["job_page"]["total"] == 0
    assert (await status(session, "?jobs_state=succeeded"))["job_table"] == []
    await sub.close()


async def test_kind_table_counts_backlog_running_run_times_failures_and_says_why_work_waits(
        hub: InProcessHub, session: aiohttp.ClientSession) -> None:
    gpu_client, gpu_id = await agent(hub, "gpu-box", {**CPU, "gpus": [GTX]})
    sub = await submitter(hub)
    await submit(sub, make_envelope(sub.identity, job(3, "small")))
    big = make_envelope(sub.identity, job(4, "big", requires={"device": "gpu", "min_vram_gb": 16}))
    await submit(sub, big)
    await submit(sub, make_envelope(sub.identity, job(2, "big-2", requires={"device": "gpu", "min_vram_gb": 16})))
    await run_one(gpu_client, gpu_id, wall_s=10.0)
    await run_one(gpu_client, gpu_id, wall_s=30.0)
    await run_one(gpu_client, gpu_id, "failed")
    assert hub.server is not None
    feed = hub.server.app[status_page.FEED_KEY]

    def sleep_row() -> dict[str, Any] | None:
        snap = feed.snapshot
        rows = [r for r in (snap.base["kinds"] if snap else []) if r["kind"] == "sleep"]
        return rows[0] if rows and rows[0]["recent_attempts"] == 3 and rows[0]["waiting_because"] else None

    await wait_for_async(sleep_row, "the kind table with the three attempts")
    [row] = [r for r in (await status(session))["kinds"] if r["kind"] == "sleep"]
    assert row["jobs"] == 3 and row["queued"] == 4 + 2 + 1 and row["running"] == 0
    assert row["run_s_median"] == 30.0 and row["run_s_p90"] == 30.0   # of the ok attempts, by wall_s
    assert row["failure_rate"] == pytest.approx(1 / 3, abs=1e-3)
    # the two GPU jobs share one requirement group: one line, counting both jobs' tasks
    assert row["waiting_because"] == [
        "6 tasks of 2 jobs wait: needs min_vram_gb 16: 0 of 1 connected agents have it (largest: 6.0)"]

    # the CPU job's last task leased: the agent is busy, and what is queued says so
    leased = await gpu_client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 5})
    assert len(leased["tasks"]) == 1

    def busy_line() -> list[str] | None:
        snap = feed.snapshot
        rows = [r for r in (snap.base["kinds"] if snap else []) if r["kind"] == "sleep"]
        lines = rows[0]["waiting_because"] if rows and rows[0]["running"] == 1 else []
        return lines if any("busy" in line for line in lines) else None

    await submit(sub, make_envelope(sub.identity, job(2, "more")))
    lines = await wait_for_async(busy_line, "an 'all capable agents busy' line")
    assert "2 tasks wait: the one capable connected agent is busy" in lines
    await gpu_client.close()
    await sub.close()


async def test_history_survives_a_hub_restart(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path)
    await hub.start()
    try:
        client, ident = await agent(hub, "worker", CPU)
        sub = await submitter(hub)
        await submit(sub, make_envelope(sub.identity, job(3, "before")))
        await run_one(client, ident)
        await run_one(client, ident, "failed")
        await client.close()
        await sub.close()
        async with session_for(hub) as s:
            before = (await status(s))["history"]
        assert sum(before["done"]) == 1 and sum(before["failed"]) == 1 and max(before["agents"]) == 1
        await hub.stop()                                    # a clean stop writes the buckets
        await hub.start()                                   # same database
        async with session_for(hub) as s:
            after = (await status(s))["history"]
        assert after["bucket_s"] == BUCKET_S and len(after["done"]) == HISTORY_S // BUCKET_S
        assert sum(after["done"]) == 1 and sum(after["failed"]) == 1 and max(after["agents"]) >= 1
        assert max(after["backlog"]) >= 1
    finally:
        await hub.stop()


async def test_status_history_is_kept_for_a_day_and_merges_with_counts_since_start(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.db")
    await store.open()
    now = 1_000 * BUCKET_S + 30.0
    old = StatusHistory(store)
    old.count(now - HISTORY_S - BUCKET_S, True)              # older than a day: dropped at the write
    old.count(now - 3 * BUCKET_S, True)
    old.count(now, False)
    old.sample(now, agents=5, backlog=40)
    await old.flush(now, force=True)
    new = StatusHistory(store)
    new.count(now, True)                                     # counted since this start, before the load
    await new.load(now)
    rows = {r["start"]: r for r in new.rows(now)}
    start = StatusHistory.bucket_of(now)
    assert rows[start] == {"start": start, "done": 1, "failed": 1, "agents": 5, "backlog": 40}
    assert rows[start - 3 * BUCKET_S]["done"] == 1
    assert sum(r["done"] for r in rows.values()) == 2 and len(rows) == HISTORY_S // BUCKET_S
    stored = await store.load_status_history(0)
    assert [b.start for b in stored] == [start - 3 * BUCKET_S, start]
    await store.close()


async def test_status_history_is_written_again_soon_after_the_clock_goes_back(tmp_path: Path) -> None:
    """Written at most once per FLUSH_S, judged on the board's wall clock: set back an hour, the next flush
    writes (or an hour of counts would wait in memory for the clock to come back, lost to a crash)."""
    store = SqliteStore(tmp_path / "h.db")
    await store.open()
    now = 1_000 * BUCKET_S + 30.0
    history = StatusHistory(store)
    history.count(now, True)
    await history.flush(now)
    history.count(now + 1, True)
    await history.flush(now + 1)                             # within FLUSH_S: not yet written
    assert [b.done for b in await store.load_status_history(0)] == [1]
    back = now - 3600.0                                      # an NTP step back by an hour
    history.count(back, False)
    await history.flush(back)
    stored = {b.start: b for b in await store.load_status_history(0)}
    assert stored[StatusHistory.bucket_of(now)].done == 2
    assert stored[StatusHistory.bucket_of(back)].failed == 1
    await store.close()


async def test_a_database_from_before_the_history_gains_its_table_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:                      # as a hub before the history made it
        conn.execute("DROP TABLE status_history")
    store = SqliteStore(path)
    await store.open()
    assert await store.load_status_history(0) == []
    await store.save_status_history([HistoryBucket(600.0, done=2, failed=1, agents=3, backlog=4)], 0)
    assert await store.load_status_history(0) == [HistoryBucket(600.0, 2, 1, 3, 4)]
    await store.close()


def test_kind_run_times_are_a_bounded_window_with_median_p90_and_failure_rate() -> None:
    from hub.records import JobRow, JobState
    stats = KindStats()
    row = JobRow(id="j", name="j", submitter_id="s", kind="train", priority=0, state=JobState.RUNNING,
                 created_at=0.0, n_tasks=1, envelope={}, requires={}, timeout_s=100.0, max_attempts=3)
    for i in range(WINDOW + 100):                    # the first 100 fall out of the window
        stats.settled(row, True, {"wall_s": 1000.0 if i < 100 else float(i % 10)})
    stats.settled(row, False, {})
    stats.settled(row, True, {"wall_s": "fast"})     # not a number: counted, no run time
    stats.settled(row, True, {"wall_s": -5})         # clamped to [0, timeout]
    [table] = stats.table([], {"train": ["why"]})
    assert table["recent_attempts"] == WINDOW and table["failure_rate"] == pytest.approx(1 / WINDOW)
    assert table["run_s_median"] in (4.0, 5.0) and table["run_s_p90"] == 9.0   # no 1000 s (100 s cap) left
    assert table["waiting_because"] == ["why"] and json.dumps(table)


def _fleet(n: int, caps: dict[str, Any], busy: int = 0, quarantined: int = 0) -> list[Any]:
    from hub.fleet import AgentState
    from hub.records import AgentRow
    out = []
    for i in range(n):
        ident = Identity.generate()
        state = AgentState(AgentRow(ident.id, ident.public.text(), f"a{i}", caps, 0.0), ident.public,
                           Capabilities.from_dict(caps))
        if i < busy:
            state.running.add(f"t{i}")
        elif i < busy + quarantined:
            state.refused = "quarantined: invalid results"
        out.append(state)
    return out


def _job_row(job_id: str, requires: dict[str, Any]) -> Any:
    from hub.records import JobRow, JobState
    return JobRow(id=job_id, name=job_id, submitter_id="s", kind="sleep", priority=0, state=JobState.QUEUED,
                  created_at=0.0, n_tasks=5, envelope={}, requires=requires, timeout_s=60.0, max_attempts=3)


def test_why_work_waits_names_busy_and_quarantined_capable_agents_and_stays_within_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hub import status_waiting
    from jobs.requirements import Requirements
    asked: list[str] = []
    explainer = status_waiting.WaitingExplainer(lambda job_id: asked.append(job_id) or [])
    gpu16 = {**CPU, "gpus": [{**GTX, "vram_gb": 16.0}]}
    explainer.begin()
    explainer.fold(_fleet(3, CPU) + _fleet(4, gpu16, busy=3, quarantined=1))
    assert len(explainer.classes) == 2                   # seven agents, two capability classes
    big = {"device": "gpu", "min_vram_gb": 16}
    for i in range(3):
        explainer.add_job(_job_row(f"big{i}", big), Requirements.from_dict(big), 5)
    explainer.add_job(_job_row("huge", {"min_vram_gb": 80, "device": "gpu"}),
                      Requirements.from_dict({"min_vram_gb": 80, "device": "gpu"}), 2)
    explainer.explain(now=100.0)
    assert explainer.kind_lines("sleep") == [
        "15 tasks of 3 jobs wait: 1 of 4 capable connected agents is quarantined; "
        "every other capable connected agent is busy",
        "2 tasks wait: needs a GPU: 4 of 7 connected agents have it; "
        "needs min_vram_gb 80: 0 of 7 connected agents have it (largest: 16.0)"]
    assert explainer.job_lines("big1") == explainer.job_lines("big0") and asked == []

    # a fleet of many classes: each snapshot explains only what its budget allows, the rest on later ones
    monkeypatch.setattr(status_waiting, "EXPLAIN_BUDGET", 4)
    explainer.begin()
    explainer.fold(_fleet(2, CPU) + _fleet(2, gpu16))
    for i in range(5):
        req = {"min_memory_gb": i + 1}
        explainer.add_job(_job_row(f"m{i}", req), Requirements.from_dict(req), 1)
    explainer.explain(now=200.0)
    assert len(asked) == 2                               # 2 classes per group, budget 4: two groups this time
    explainer.explain(now=200.5)
    assert len(asked) == 4


async def test_work_waiting_for_a_second_agent_to_validate_says_so(hub: InProcessHub,
                                                                  session: aiohttp.ClientSession) -> None:
    client, ident = await agent(hub, "lonely", CPU)
    sub = await submitter(hub)
    made = await submit(sub, make_envelope(sub.identity, job(1, "checked", policy={"replicas": 2})))
    await run_one(client, ident)                      # one instance answered; its twin may not go to the same agent
    assert hub.server is not None
    feed = hub.server.app[status_page.FEED_KEY]

    def lines() -> list[str] | None:
        snap = feed.snapshot
        rows = [r for r in (snap.base["kinds"] if snap else []) if r["kind"] == "sleep"]
        return rows[0]["waiting_because"] if rows and rows[0]["waiting_because"] else None

    [line] = await wait_for_async(lines, "a why-waiting line for the unvalidated unit")
    assert line.startswith("1 task wait: needs an answer from another agent")
    [row] = (await status(session, f"?jobs_q={made['id']}"))["job_table"]
    assert row["waiting_because"][0].startswith("needs an answer from another agent")
    await client.close()
    await sub.close()
