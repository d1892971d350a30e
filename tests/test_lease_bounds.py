"""Lease bounds the hub enforces whatever an agent says (issue #16 part 7), over real TLS and HTTP:
an agent holds at most its advertised slots (within the hub's cap), a lease ends at the task's
timeout plus a grace however often it is heartbeated, and result records have a size cap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import wait_for_async
from test_api import registered, submitter

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.metrics import METRICS_KEY
from jobs.manifest import Manifest
from security.errors import PayloadTooLarge
from security.records import SignedRecord


def sleep_job(n: int, timeout: str = "1h", retries: int = 0) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "bounds"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n},
                                        "resources": {"timeout": timeout}, "policy": {"retries": retries}}})


async def held_after_asking(client: BoardClient, times: int, slots: int) -> int:
    held = 0
    for _ in range(times):
        held += len((await client.call("POST", "/v1/lease", {"slots": slots, "wait_s": 0}))["tasks"])
    return held


async def test_an_agent_holds_at_most_its_advertised_slots_and_the_hubs_cap(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, max_slots_per_agent=6)
    await hub.start()
    sub = await submitter(hub)
    four, _ = await registered(hub, slots=4)
    liar, _ = await registered(hub, slots=64)     # advertises more than the hub allows
    silent, _ = await registered(hub)             # advertises nothing
    try:
        await submit(sub, make_envelope(sub.identity, sleep_job(100)))
        # Asking for 64 again and again: what it holds already counts.
        assert await held_after_asking(four, 8, 64) == 4
        assert await held_after_asking(liar, 8, 64) == 6
        assert await held_after_asking(silent, 8, 64) == 6
        tasks = (await sub.call("GET", f"/v1/jobs/{(await sub.call('GET', '/v1/jobs'))['jobs'][0]['id']}/tasks"))
        assert sum(1 for t in tasks["tasks"] if t["state"] == "leased") == 16
    finally:
        for client in (sub, four, liar, silent):
            await client.close()
        await hub.stop()


async def test_a_lease_heartbeated_forever_ends_at_the_task_timeout_plus_grace(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, lease_ttl_s=1.0, lease_timeout_grace_s=0.5)
    await hub.start()
    sub = await submitter(hub)
    client, _ = await registered(hub, slots=1)
    try:
        job = await submit(sub, make_envelope(sub.identity, sleep_job(1, timeout="1s", retries=0)))
        [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 1}))["tasks"]
        lost: list[Any] = []

        async def heartbeat_forever() -> None:
            while not lost:
                reply = await client.call("POST", "/v1/heartbeat", {"leases": [
                    {"task_id": task["task_id"], "lease_id": task["lease_id"], "progress": 0.1}]})
                lost.extend(reply["lost"])
                await asyncio.sleep(0.1)   # a heartbeat interval, not synchronisation

        beating = asyncio.create_task(heartbeat_forever())
        try:
            await wait_for_async(lambda: bool(lost), "the board to end the heartbeated lease at the timeout + grace")
            view = (await sub.call("GET", f"/v1/jobs/{job['id']}"))["job"]
            assert view["state"] == "failed"
            tasks = (await sub.call("GET", f"/v1/jobs/{job['id']}/tasks"))["tasks"]
            assert tasks[0]["error_class"] == "timeout" and "timeout" in tasks[0]["error"]
            assert lost[0]["task_id"] == task["task_id"]
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
    finally:
        for c in (sub, client):
            await c.close()
        await hub.stop()


@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")   # aiohttp, on a 3.5 MB body
async def test_an_oversized_result_record_is_refused_with_413_and_the_attempt_fails(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path)   # the default cap (256 KiB) against a 3.5 MB result of a sleep task
    await hub.start()
    sub = await submitter(hub)
    client, agent = await registered(hub, slots=1)
    try:
        job = await submit(sub, make_envelope(sub.identity, sleep_job(1, retries=0)))
        [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 1}))["tasks"]
        record = SignedRecord.sign(agent, {
            "task_id": task["task_id"], "job_id": task["job_id"], "lease_id": task["lease_id"],
            "attempt": task["attempt"], "agent_id": agent.id, "status": "ok",
            "values": {"padding": "x" * 3_500_000}}).to_wire()
        with pytest.raises(PayloadTooLarge, match="max_result_bytes") as exc:
            await client.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
        assert exc.value.code == "result_too_large"
        view = (await sub.call("GET", f"/v1/jobs/{job['id']}"))["job"]
        assert view["state"] == "failed" and "max_result_bytes" in view["error"]
        assert (await sub.call("GET", f"/v1/jobs/{job['id']}/results"))["results"] == []
    finally:
        for c in (sub, client):
            await c.close()
        await hub.stop()


async def test_concurrent_long_polls_of_one_agent_share_its_slots(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, max_poll_wait_s=3600)
    await hub.start()
    sub = await submitter(hub)
    client, _ = await registered(hub, slots=3)
    polls = [asyncio.create_task(client.call("POST", "/v1/lease", {"slots": 3, "wait_s": 3600}, timeout_s=3600))
             for _ in range(4)]
    try:
        assert hub.server is not None
        board = hub.server.board
        dispatches = hub.server.app[METRICS_KEY].registry
        # All four polls asked the policy once, found the board empty, and parked.
        await wait_for_async(lambda: dispatches.get_sample_value("panal_dispatch_seconds_count") == 4,
                             "the four polls to park")
        await submit(sub, make_envelope(sub.identity, sleep_job(20)))
        await wait_for_async(lambda: all(p.done() for p in polls), "every poll to answer")
        got = sum(len(p.result()["tasks"]) for p in polls)
        assert got == 3 and len(board.view.agents[client.identity.id].running) == 3
    finally:
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        for c in (sub, client):
            await c.close()
        await hub.stop()
