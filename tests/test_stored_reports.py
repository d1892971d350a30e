"""Capability reports a hub stored before it checked a field: a hub restart (an upgrade) must not fail on them.

A board keeps each agent's report as the agent sent it (unknown fields exactly), and reads it again at start
(``Fleet.load``). When a release starts checking a field it used to keep as unknown (``features``, ``code_from``),
a report an older hub took from a stranger may fail the new check: that must cost the agent what the field would
grant (never more), not the hub its start. A real board over TLS in this process, its real SQLite store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from hub_clients import submitter
from test_api import registered, sleep_manifest

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.sqlite_store import SqliteStore
from jobs.protocol import LeaseReply, LeaseRequest

# what hubs before the ``features`` check stored without looking (a stranger's report, a careless client's)
STORED_BEFORE = {
    "a string": "unit-proofs",
    "too many names": [f"f{i}" for i in range(40)],
    "a name too long": ["x" * 100],
    "not names": [{"unit-proofs": True}],
}


async def rewrite_report(hub: InProcessHub, agent_id: str, **fields: Any) -> None:
    """Change an agent's stored report as an older hub would have stored it (the hub is stopped)."""
    store = SqliteStore(hub.home.db_path)
    await store.open()
    try:
        row = next(r for r in await store.list_agents() if r.id == agent_id)
        await store.upsert_agent(dataclasses.replace(row, capabilities={**row.capabilities, **fields}))
    finally:
        await store.close()


@pytest.mark.parametrize("features", list(STORED_BEFORE.values()), ids=list(STORED_BEFORE))
async def test_a_hub_restarts_over_an_agents_stored_report_its_features_check_would_refuse(
        tmp_path: Path, features: Any) -> None:
    """The agent stays registered (it leases at once: no re-registration, no admission token again) and runs what
    the rest of its report allows, but the unreadable ``features`` grants it nothing: no committed job's tasks."""
    hub = InProcessHub(tmp_path)
    await hub.start()
    agent, identity = await registered(hub)
    await agent.close()
    await hub.stop()
    await rewrite_report(hub, identity.id, features=features)
    server = await hub.start()   # raised ValueError out of Fleet.load: the hub did not start
    try:
        assert server.board.agents[identity.id].caps.features == frozenset()
        async with await submitter(hub) as user:
            committed = (await submit(user, make_envelope(user.identity, sleep_manifest(3), commit_bytes=0)))["id"]
            whole = (await submit(user, make_envelope(user.identity, sleep_manifest(2))))["id"]
        assert hub.address is not None
        async with BoardClient(hub.address, identity, retry_for_s=1) as again:
            reply = await again.post("/v1/lease", LeaseRequest(8, 0.5, (), {}), LeaseReply.decode)
            assert {t.job_id for t in reply.tasks} == {whole} and len(reply.tasks) == 2
            view = await again.call("GET", f"/v1/jobs/{committed}/public")
        assert any("unit-proofs" in line for line in view["waiting_because"]), view
    finally:
        await hub.stop()


async def test_a_stored_report_past_reading_leaves_its_agent_registered_but_sent_nothing(tmp_path: Path) -> None:
    """A stored report the board cannot read at all (a check added later refuses more than ``features``) matches
    no job until the agent registers again, instead of matching every kind as an empty report would."""
    hub = InProcessHub(tmp_path)
    await hub.start()
    agent, identity = await registered(hub)
    await agent.close()
    await hub.stop()
    await rewrite_report(hub, identity.id, cpu={"cores": "many"})
    server = await hub.start()
    try:
        assert identity.id in server.board.agents
        async with await submitter(hub) as user:
            await submit(user, make_envelope(user.identity, sleep_manifest(2)))
        assert hub.address is not None
        async with BoardClient(hub.address, identity, retry_for_s=1) as again:
            reply = await again.post("/v1/lease", LeaseRequest(8, 0.5, (), {}), LeaseReply.decode)
            assert reply.tasks == ()
    finally:
        await hub.stop()
