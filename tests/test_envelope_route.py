"""A job's envelope in lease replies, over a real board and TLS: once per reply and none the agent holds (it says
so in ``have``), every one for an agent that predates ``have``, a big one left out and fetched by its lessees only
(``GET /v1/jobs/{id}/envelope``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from test_api import raw, registered, sleep_manifest, submitter

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from jobs.protocol import LeaseReply, LeaseRequest, envelope_digest
from jobs.wire import JSON
from security.errors import PanalError
from security.httpsig import sign_request
from security.records import SignedRecord


async def lease(client: BoardClient, slots: int, have: dict[str, str] | None) -> LeaseReply:
    return await client.post("/v1/lease", LeaseRequest(slots, 0.0, (), have), LeaseReply.decode)


async def a_job(user: BoardClient, tasks: int) -> tuple[str, SignedRecord]:
    """Signed whole however big, as a client before committed manifests (jobs/committed.py) signed it: the
    fetch route is how its agents get it."""
    envelope = make_envelope(user.identity, sleep_manifest(tasks), commit_bytes=1 << 40)
    job = await submit(user, envelope)
    return str(job["id"]), SignedRecord.from_wire(envelope)


async def test_a_reply_carries_each_jobs_envelope_once_and_none_the_agent_says_it_holds(hub: InProcessHub) -> None:
    async with await submitter(hub) as user:
        job, envelope = await a_job(user, 40)
    old, _ = await registered(hub)
    new, _ = await registered(hub)
    try:
        # an agent that predates ``have``: every assignment carries its envelope, as before
        assert [t.envelope for t in (await lease(old, 4, None)).tasks] == [envelope] * 4
        # one that sends ``have`` (holding nothing yet): the first of the job's assignments carries it
        first = (await lease(new, 4, {})).tasks
        assert [t.envelope for t in first] == [envelope, None, None, None] and {t.job_id for t in first} == {job}
        await finish(new, first)
        # holding it: none; naming another envelope under the job's id: it comes again
        assert [t.envelope for t in (await lease(new, 4, {job: envelope_digest(envelope)})).tasks] == [None] * 4
    finally:
        await old.close()
        await new.close()
    stats = hub.server.board.view.stats if hub.server else {}
    assert (stats["envelopes_sent"], stats["envelopes_omitted"]) == (5, 7)


async def finish(client: BoardClient, tasks: Any) -> None:
    """Give the leased tasks back, so the agent has free slots again."""
    for t in tasks:
        await client.call("POST", f"/v1/tasks/{t.task_id}/release", {"lease_id": t.lease_id})


async def test_a_stale_digest_gets_the_envelope_again(hub: InProcessHub) -> None:
    async with await submitter(hub) as user:
        job, envelope = await a_job(user, 4)
    client, _ = await registered(hub)
    try:
        [task] = (await lease(client, 1, {job: "0123456789abcdef"})).tasks
        assert task.envelope == envelope
    finally:
        await client.close()


async def test_a_big_envelope_is_left_out_and_only_a_lessee_of_its_job_may_fetch_it(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, inline_envelope_bytes=256)
    await hub.start()
    try:
        lessee, _ = await registered(hub)
        stranger, _ = await registered(hub)
        old, _ = await registered(hub)
        user = await submitter(hub)
        try:
            _, small_envelope = await a_job(user, 2)     # a small job's envelope rides inline, once
            assert [t.envelope for t in (await lease(stranger, 2, {})).tasks] == [small_envelope, None]
            job, envelope = await a_job(user, 10_000)   # ~90 KB of sweep: over the inline limit, two chunks
            tasks = (await lease(lessee, 4, {}))
            assert [(t.job_id, t.envelope) for t in tasks.tasks] == [(job, None)] * 4
            fetched = SignedRecord.from_wire(await lessee.call("GET", f"/v1/jobs/{job}/envelope"))
            assert fetched == envelope
            with pytest.raises(PanalError) as refused:
                await stranger.call("GET", f"/v1/jobs/{job}/envelope")
            assert (refused.value.status, refused.value.code) == (403, "not_leased")
            with pytest.raises(PanalError) as unknown:
                await lessee.call("GET", "/v1/jobs/j00000000000000000000/envelope")
            assert (unknown.value.status, unknown.value.code) == (404, "no_such_job")
            # a JSON client gets the same record, base64 bytes and all
            path = f"/v1/jobs/{job}/envelope"
            headers = {**sign_request(lessee.identity, "GET", path, "", b""), "Accept": JSON}
            status, body = await raw(hub, "GET", path, b"", headers)
            assert status == 200 and SignedRecord.from_wire(body) == envelope
            # an agent that predates ``have`` still gets a small one in every assignment, but never a big one: a
            # volunteer leaving ``have`` out must not make the board build replies of many 90 KB copies
            assert [t.envelope for t in (await lease(old, 3, None)).tasks] == [None] * 3
        finally:
            for client in (lessee, stranger, old, user):
                await client.close()
        assert hub.server is not None
        stats = hub.server.board.view.stats
        # to fetch: the lessee's reply, then the one without ``have``; fetched: as msgpack, then as JSON
        assert (stats["envelopes_to_fetch"], stats["envelopes_fetched"]) == (2, 2)
    finally:
        await hub.stop()


async def test_the_board_decodes_a_jobs_envelope_once_not_per_assignment(hub: InProcessHub) -> None:
    async with await submitter(hub) as user:
        _, envelope = await a_job(user, 8)
    client, agent = await registered(hub)
    try:
        assert hub.server is not None
        board = hub.server.board
        first = await board.lease(agent.id, 4, 0)          # an agent without ``have``: every one carries it
        again = await board.lease(agent.id, 4, 0)
        records = {id(t.envelope) for t in first + again}
        assert len(records) == 1 and first[0].envelope == envelope
    finally:
        await client.close()
