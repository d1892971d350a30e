"""Rows a hub stored before an upgrade added a check or a clause: the upgraded hub must start over them and apply
its rules to them.

Capability reports: a board keeps each agent's report as the agent sent it (unknown fields exactly) and reads it
again at start (``Fleet.load``). When a release starts checking a field it kept as unknown (``features``,
``code_from``), a report an older hub took from a stranger may fail the check: that must cost the agent what the
field would grant (never more), not the hub its start. Jobs: a committed job stored before its ``requires`` named
``unit-proofs`` must still go only to agents that check unit proofs. A real board over TLS in this process, its
real SQLite store.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from hub_clients import submitter
from test_api import registered, sleep_manifest
from test_e2e_committed import only_a_newer_agent_gets

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
    await rewrite_report(hub, identity.id, features=features, code_from=["*"])
    server = await hub.start()   # raised ValueError out of Fleet.load: the hub did not start
    try:
        caps = server.board.agents[identity.id].caps
        assert caps.features == frozenset() and caps.code_from == {"*"}   # a field that reads is kept
        async with await submitter(hub) as user:
            committed = (await submit(user, make_envelope(user.identity, sleep_manifest(3), commit_bytes=0)))["id"]
            whole = (await submit(user, make_envelope(user.identity, sleep_manifest(2))))["id"]
        assert hub.address is not None
        async with BoardClient(hub.address, identity, retry_for_s=1) as again:
            reply = await again.post("/v1/lease", LeaseRequest(8, 0.5, (), {}), LeaseReply.decode)
            assert {t.job_id for t in reply.tasks} == {whole} and len(reply.tasks) == 2
            view = await again.call("GET", f"/v1/jobs/{committed}/public")
            status = await again.call("GET", "/v1/status")   # the status page reads the agent as loaded
        assert any("unit-proofs" in line for line in view["waiting_because"]), view
        assert status["agents"]["online"] == 1
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
            status = await again.call("GET", "/v1/status")
        assert status["agents"]["online"] == 1
    finally:
        await hub.stop()


async def test_a_committed_job_stored_before_it_required_unit_proofs_still_goes_only_to_agents_that_check_them(
        tmp_path: Path) -> None:
    """A hub before the ``features`` clause stored a committed job's ``requires`` without it: after the upgrade an
    older agent (no ``unit-proofs``) must not be sent its tasks (it refuses each as tampered, an attempt spent)."""
    hub = InProcessHub(tmp_path)
    await hub.start()
    async with await submitter(hub) as user:
        committed = (await submit(user, make_envelope(user.identity, sleep_manifest(3), commit_bytes=0)))["id"]
    await hub.stop()
    with sqlite3.connect(hub.home.db_path) as db:   # the job's requires as that hub wrote them
        (stored,) = db.execute("SELECT requires FROM jobs WHERE id = ?", (committed,)).fetchone()
        requires = json.loads(stored)
        assert requires.pop("features") == ["unit-proofs"]
        db.execute("UPDATE jobs SET requires = ? WHERE id = ?", (json.dumps(requires), committed))
    db.close()
    await hub.start()
    try:
        assert await only_a_newer_agent_gets(hub, committed, 3) == ()
    finally:
        await hub.stop()
