"""``GET /metrics`` after real signed traffic over TLS: parses with prometheus_client's parser; counters move."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from conftest import InProcessHub
from helpers import wait_for_async
from prometheus_client.parser import text_string_to_metric_families
from test_connections import client_tls

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.board import AgentState
from jobs.manifest import Manifest
from security.errors import Conflict
from security.httpsig import sign_request
from security.identity import Identity
from security.records import SignedRecord

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(hub: InProcessHub) -> Samples:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
            session.get("/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Refuse:
    """A lease gate quarantining one agent (the board's LeaseGate interface)."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    def refuse(self, agent: AgentState) -> str | None:
        return "too many failed results" if agent.row.id == self.agent_id else None


def signed_result(ident: Identity, task: dict[str, Any], status: str = "ok") -> dict[str, Any]:
    return SignedRecord.sign(ident, {"task_id": task["task_id"], "job_id": task["job_id"],
                                     "lease_id": task["lease_id"], "attempt": task["attempt"], "agent_id": ident.id,
                                     "status": status, "values": {}, "error_class": "oom"}).to_wire()


async def test_counters_move_with_real_traffic(hub: InProcessHub) -> None:
    assert hub.address is not None and hub.server is not None
    before = await scrape(hub)
    assert value(before, "panal_leases_total") == 0
    assert value(before, "panal_agents", state="idle") == 0

    ident = Identity.generate()
    agent = BoardClient(hub.address, ident, retry_for_s=1)
    await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "m",
                                            "capabilities": {"kinds": ["sleep"]}})
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "u")
    sub = BoardClient(hub.address, user, retry_for_s=1)
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "m"},
                                   "spec": {"task": "sleep", "sweep": {"seconds": [0.0, 0.0]},
                                            "policy": {"retries": 1}}})
    await submit(sub, make_envelope(user, manifest))
    queued = await scrape(hub)
    assert value(queued, "panal_tasks", state="queued") == 2 and value(queued, "panal_jobs_active") == 1
    assert value(queued, "panal_agents", state="idle") == 1 and value(queued, "panal_agents_online") == 1

    # one task fails transiently (retried), then both succeed
    [task] = (await agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 1}))["tasks"]
    running = await scrape(hub)
    assert value(running, "panal_tasks", state="leased") == 1 and value(running, "panal_agents", state="busy") == 1
    await agent.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": signed_result(ident, task, "failed")})
    for _ in range(2):
        [task] = (await agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 3}))["tasks"]
        record = signed_result(ident, task)
        await agent.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    again = await agent.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    assert again["status"] == "duplicate"
    with pytest.raises(Conflict):   # a different result for a settled task is rejected
        await agent.call("POST", f"/v1/tasks/{task['task_id']}/result",
                         {"result": signed_result(ident, {**task, "lease_id": "other"})})

    after = await scrape(hub)
    assert value(after, "panal_leases_total") == 3
    assert value(after, "panal_task_retries_total") == 1
    assert value(after, "panal_results_total", outcome="accepted") == 2
    assert value(after, "panal_results_total", outcome="failed") == 1
    assert value(after, "panal_results_total", outcome="duplicate") == 1
    assert value(after, "panal_jobs_active") == 0 and value(after, "panal_tasks", state="queued") == 0
    assert value(after, "panal_dispatch_seconds_count") >= 3
    lease_route = {"method": "POST", "route": "/v1/lease"}
    assert value(after, "panal_http_request_duration_seconds_count", **lease_route) >= 3
    assert value(after, "panal_http_requests_total", status="200", **lease_route) >= 3
    result_route = {"method": "POST", "route": "/v1/tasks/{task_id}/result"}
    assert value(after, "panal_http_requests_total", status="409", **result_route) == 1
    # no raw paths (task ids) as labels
    assert not any(task["task_id"] in dict(labels).get("route", "") for _, labels in after)
    await agent.close()
    await sub.close()


async def test_quarantines_and_unmatched_routes(hub: InProcessHub) -> None:
    assert hub.address is not None and hub.server is not None
    ident = Identity.generate()
    agent = BoardClient(hub.address, ident, retry_for_s=1)
    await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "q",
                                            "capabilities": {"kinds": ["sleep"]}})
    gate = Refuse(ident.id)
    hub.server.board.add_gate(gate)
    reply = await agent.call("POST", "/v1/lease", {"slots": 1})
    assert reply["refused"] == "too many failed results"
    assert hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
            session.get("/no/such/thing") as resp:
        assert resp.status == 404
    samples = await scrape(hub)
    assert value(samples, "panal_agents", state="quarantined") == 1
    assert value(samples, "panal_quarantines_total") == 1
    assert value(samples, "panal_http_requests_total", method="GET", route="unmatched", status="404") == 1
    hub.server.board.remove_gate(gate)
    await agent.call("POST", "/v1/lease", {"slots": 1})
    samples = await scrape(hub)
    assert value(samples, "panal_agents", state="quarantined") == 0
    assert value(samples, "panal_quarantines_total") == 1
    await agent.close()


async def test_each_board_has_its_own_registry(hub: InProcessHub, tmp_path: Path) -> None:
    other = InProcessHub(tmp_path / "other")
    await other.start()
    try:
        assert hub.address is not None
        ident = Identity.generate()
        async with BoardClient(hub.address, ident, retry_for_s=1) as agent:
            await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "x",
                                                    "capabilities": {"kinds": ["sleep"]}})
        assert value(await scrape(hub), "panal_agents", state="idle") == 1
        assert value(await scrape(other), "panal_agents", state="idle") == 0
        assert value(await scrape(other), "panal_http_requests_total", method="POST", route="/v1/agents",
                     status="200") == 0
    finally:
        await other.stop()


async def test_lease_wakeups_count_parked_requests_woken_by_new_work(hub: InProcessHub) -> None:
    """``panal_lease_wakeups_total`` (what ``panal bench fleet`` divides by tasks): a lease request parked
    with nothing to do and woken by a submission counts once; a request that found work at once does not."""
    assert hub.address is not None and hub.server is not None
    ident = Identity.generate()
    agent = BoardClient(hub.address, ident, retry_for_s=1)
    await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "w",
                                            "capabilities": {"kinds": ["sleep"]}})
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "u")
    sub = BoardClient(hub.address, user, retry_for_s=1)
    assert value(await scrape(hub), "panal_lease_wakeups_total") == 0
    poll = asyncio.create_task(agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 15}))
    while len(hub.server.board._dispatcher.waiters) == 0:   # the request is parked, waiting for work
        await asyncio.sleep(0.01)
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "w"},
                                   "spec": {"task": "sleep", "sweep": {"seconds": [0.0, 0.0]}}})
    await submit(sub, make_envelope(user, manifest))
    assert len((await poll)["tasks"]) == 1
    assert value(await scrape(hub), "panal_lease_wakeups_total") == 1
    assert len((await agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 15}))["tasks"]) == 1  # no wait
    assert value(await scrape(hub), "panal_lease_wakeups_total") == 1
    await agent.close()
    await sub.close()


async def test_lease_service_time_counts_each_lease_and_leaves_its_long_poll_wait_out(hub: InProcessHub) -> None:
    """``panal_lease_service_seconds`` (the hub-side lease time ``panal bench fleet`` reports): one observation
    per lease request; a request parked 3 s for work that never came is timed without those 3 s, while the
    request latency histogram, which times the whole request, has them."""
    assert hub.address is not None and hub.server is not None
    ident = Identity.generate()
    agent = BoardClient(hub.address, ident, retry_for_s=1)
    await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "s",
                                            "capabilities": {"kinds": ["sleep"]}})
    before = await scrape(hub)
    assert value(before, "panal_lease_service_seconds_count") == 0
    assert (await agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 3}))["tasks"] == []   # parked 3 s
    after = await scrape(hub)
    assert value(after, "panal_lease_service_seconds_count") == 1
    whole = value(after, "panal_http_request_duration_seconds_sum", method="POST", route="/v1/lease")
    served = value(after, "panal_lease_service_seconds_sum")
    assert whole >= 3.0
    assert 0 < served <= whole - 2.5     # its wait (3 s less what came before it parked) is left out
    await agent.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0})
    assert value(await scrape(hub), "panal_lease_service_seconds_count") == 2
    await agent.close()


async def test_lease_service_time_leaves_out_waiting_for_a_slow_clients_body(hub: InProcessHub) -> None:
    """A client that sends a lease request's head, then its body 1.5 s later: the request latency has the 1.5 s,
    the hub's lease service time does not (what it measures is the hub, not a busy client's pace)."""
    assert hub.address is not None and hub.server is not None
    ident = Identity.generate()
    agent = BoardClient(hub.address, ident, retry_for_s=1)
    await agent.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": "slow",
                                            "capabilities": {"kinds": ["sleep"]}})
    body = msgpack.packb({"slots": 1, "wait_s": 0})
    signed = sign_request(ident, "POST", "/v1/lease", "", body)
    head = "".join(f"{k}: {v}\r\n" for k, v in signed.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.server.port, ssl=client_tls())
    writer.write(f"POST /v1/lease HTTP/1.1\r\nHost: hub\r\nContent-Type: application/msgpack\r\n"
                 f"Accept: application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
    guard = hub.server.sites[0].guard
    assert guard is not None
    await wait_for_async(lambda: any(conn._busy() for conn in guard.open), "the hub to be handling the request")
    await asyncio.sleep(1.5)     # the slow client
    writer.write(body)
    status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()
    samples = await scrape(hub)
    whole = value(samples, "panal_http_request_duration_seconds_sum", method="POST", route="/v1/lease")
    assert value(samples, "panal_lease_service_seconds_count") == 1
    assert whole >= 1.5
    assert value(samples, "panal_lease_service_seconds_sum") <= whole - 1.0
    await agent.close()
