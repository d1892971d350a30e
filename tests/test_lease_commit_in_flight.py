"""A lease reply goes out while the lease's commit is in flight (hub/lease_writes.py); what that may and may not cost.

- A hub killed (SIGKILL) after the reply and before the commit lands: the restarted hub queues the task again with
  its attempt unspent, the agent's result for the lost lease is refused as an expired lease, and the task runs
  again to exactly one stored result. The commit is held back for real: another connection holds SQLite's write
  lock, so the hub's writer waits at its BEGIN.
- Order: a result whose lease's commit has not landed waits for it (the store never gets a task's result before
  its lease); the real store's ``save_leases`` is wrapped to land only when the test says.
- A lease commit that fails (the database locked past the busy timeout, for real) takes the lease back.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, start_hub_proc
from pgserver import PgServer
from test_pg_store import freeze
from test_single_task_path import Short, manifest

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.board import Board
from hub.config import HubConfig
from hub.home import HubHome
from hub.pg_store import PgStore
from hub.records import TaskState
from hub.sqlite_store import SqliteStore
from jobs.protocol import Assignment, LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_results import ResultsReply, ResultsRequest
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress


def signed_result(agent: Identity, task: Assignment) -> SignedRecord:
    return SignedRecord.sign(agent, {
        "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id, "attempt": task.attempt,
        "agent_id": agent.id, "status": "ok", "values": {"slept": 0.0}, "metrics": {"wall_s": 0.0}, "notes": [],
        "started_at": 0.0, "finished_at": 0.0})


async def lease(client: BoardClient) -> list[Assignment]:
    reply = await client.post("/v1/lease", LeaseRequest(1, 5.0, ()), LeaseReply.decode, timeout_s=30.0)
    return list(reply.tasks)


def stored_task(db: Path, task_id: str) -> tuple[str, str | None, int]:
    with sqlite3.connect(db) as conn:
        state, lease_id, attempt = conn.execute("SELECT state, lease_id, attempt FROM tasks WHERE id=?",
                                                (task_id,)).fetchone()
    return state, lease_id, attempt


def test_a_hub_killed_before_a_replied_lease_lands_runs_the_task_again_and_refuses_the_lost_lease(
        procs: Procs, tmp_path: Path) -> None:
    user_home = tmp_path / "user"
    hub, url = start_hub_proc(procs, tmp_path, user_home)
    db = HubHome(tmp_path / "hub").db_path
    user, agent = Identity.load(user_home / "user.key"), Identity.generate()

    async def before_the_kill() -> tuple[str, Assignment, int]:
        address = BoardAddress.parse(url)
        async with BoardClient(address, user) as submitter, BoardClient(address, agent) as link:
            job = await submit(submitter, make_envelope(user, manifest(1)))   # committed before its answer
            await link.post("/v1/agents", Registration(agent.public, "a", Capabilities.from_dict(
                {"kinds": ["sleep"]})), Registered.decode)
            _, _, attempt = stored_task(db, f"{job['id']}.0")
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")   # the hub's writer now waits at its BEGIN: no commit lands
            try:
                [task] = await lease(link)           # answered all the same: the commit is in flight
                hub.kill()                           # ... and the hub dies before it lands
                hub.wait()
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            return job["id"], task, attempt

    job_id, lost, attempt = asyncio.run(before_the_kill())
    assert stored_task(db, lost.task_id) == ("queued", None, attempt)   # the lease never landed; no attempt spent

    _, url = start_hub_proc(procs, tmp_path, user_home)   # (init again is a no-op on an existing hub)

    async def after_the_restart() -> None:
        address = BoardAddress.parse(url)
        async with BoardClient(address, user) as submitter, BoardClient(address, agent) as link:
            refused = await link.post("/v1/results", ResultsRequest((signed_result(agent, lost),)),
                                      ResultsReply.decode)
            [outcome] = refused.results
            assert outcome.status.value == "rejected" and outcome.error is not None
            assert outcome.error.code == "lease_expired"
            [again] = await lease(link)             # the task runs again, on its unspent attempt
            assert (again.task_id, again.attempt) == (lost.task_id, lost.attempt)
            assert again.lease_id != lost.lease_id
            accepted = await link.post("/v1/results", ResultsRequest((signed_result(agent, again),)),
                                       ResultsReply.decode)
            assert accepted.results[0].status.value == "accepted"
            final = await submitter.call("GET", f"/v1/jobs/{job_id}", query="wait=10", timeout_s=40.0)
            assert final["job"]["state"] == "succeeded"

    asyncio.run(after_the_restart())
    with sqlite3.connect(db) as conn:
        results = conn.execute("SELECT task_id, attempt FROM results WHERE job_id=?", (job_id,)).fetchall()
    assert results == [(lost.task_id, lost.attempt)]


async def test_a_result_waits_for_its_leases_commit_to_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = Short(tmp_path)
    await short.board.start()
    gate = asyncio.Event()
    try:
        await short.board.register_agent(short.agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        store = short.board.store
        assert isinstance(store, SqliteStore)
        landed: list[str] = []
        save_leases, accept_results = store.save_leases, store.accept_results

        async def slow_lease(*args: Any) -> None:
            await gate.wait()
            await save_leases(*args)
            landed.append("lease")

        async def result(*args: Any) -> None:
            landed.append("result queued")
            await accept_results(*args)
        monkeypatch.setattr(store, "save_leases", slow_lease)
        monkeypatch.setattr(store, "accept_results", result)
        job_id = await short.submit(1)
        [task] = await short.board.lease(short.agent.id, 1, 0)    # answered with its commit held back
        record = SignedRecord.sign(short.agent, {
            "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id, "attempt": task.attempt,
            "agent_id": short.agent.id, "status": "ok", "values": {}})
        accepting = asyncio.create_task(short.board.accept(short.agent.id, [record]))
        for _ in range(100):   # everything the loop can do before the lease lands (no clock involved)
            await asyncio.sleep(0)
        assert landed == [] and not accepting.done()
        gate.set()
        [outcome] = await accepting
        assert outcome.status.value == "accepted" and landed == ["lease", "result queued"]
        assert (await short.board.job_view(job_id))["state"] == "succeeded"
    finally:
        gate.set()
        await short.board.stop()


async def test_a_lease_whose_commit_fails_is_taken_back_and_its_result_refused(tmp_path: Path) -> None:
    short = Short(tmp_path)
    await short.board.start()
    blocker = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    try:
        await short.board.register_agent(short.agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        job_id = await short.submit(1)
        store = short.board.store
        assert isinstance(store, SqliteStore)
        await store._run(lambda c: c.execute("PRAGMA busy_timeout=50"))   # (the hub waits 10 s: too long here)
        blocker.execute("BEGIN IMMEDIATE")
        [task] = await short.board.lease(short.agent.id, 1, 0)
        await short.board.leases_stored()     # the commit failed: the database stayed locked
        blocker.execute("ROLLBACK")
        view = await short.board.job_view(job_id)
        assert view["tasks"] == {"queued": 1}
        assert not short.board.view.agents[short.agent.id].running
        record = SignedRecord.sign(short.agent, {
            "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id, "attempt": task.attempt,
            "agent_id": short.agent.id, "status": "ok", "values": {}})
        [outcome] = await short.board.accept(short.agent.id, [record])
        assert outcome.status.value == "rejected" and outcome.error is not None
        assert outcome.error.code == "lease_expired"
        [again] = await short.board.lease(short.agent.id, 1, 0)   # it runs again, under a new lease
        assert again.task_id == task.task_id and again.lease_id != task.lease_id
    finally:
        blocker.close()
        await short.board.stop()



async def test_a_job_cancelled_while_its_lease_is_being_written_leaves_it_out_of_the_reply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease reply is built after trust's records are written; a job cancelled meanwhile (its submitter's
    cancel, between the pick and the reply) is not handed to the agent, and the request is answered, not a 500."""
    short = Short(tmp_path)
    await short.board.start()
    gate, flushing = asyncio.Event(), asyncio.Event()
    try:
        await short.board.register_agent(short.agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        job_id = await short.submit(1)
        trust = short.board.trust
        flush = trust.flush

        async def held_flush() -> None:
            flushing.set()
            await gate.wait()
            await flush()
        monkeypatch.setattr(trust, "flush", held_flush)
        leasing = asyncio.create_task(short.board.lease(short.agent.id, 1, 0))
        await flushing.wait()                          # the lease is granted; its reply is not built yet
        await short.board.cancel(job_id, short.user.id)
        gate.set()
        assert await leasing == []
        assert (await short.board.job_view(job_id))["state"] == "cancelled"
    finally:
        gate.set()
        await short.board.stop()


async def test_a_board_stopping_while_a_replied_lease_commit_hangs_on_a_partitioned_server_still_stops(
        own_pg: PgServer) -> None:
    """Found in review: ``Board.stop`` waited for every lease commit in flight *before* it closed the store, and
    on a PostgreSQL server that stopped answering without a reset (a partition; a fenced hub must exit for its
    supervisor) such a commit never ends: the store's close, which cuts the line after its timeout and fails the
    unacknowledged writes, was never reached. Closed first, the store settles every queued write either way."""
    board = Board(PgStore(own_pg.url()), HubConfig(lease_ttl_s=10, expiry_interval_s=3600))
    await board.start()
    user, agent = Identity.generate(), Identity.generate()
    await board.submit(make_envelope(user, manifest(2)), user.id)
    await board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    freeze(own_pg, signal.SIGSTOP)   # the partition: nothing answers, no socket is reset
    try:
        [task] = await asyncio.wait_for(board.lease(agent.id, 1, 0.0), 60)   # answered: its commit is in flight
        assert task.lease_id is not None
        await asyncio.wait_for(board.stop(), 60)   # before: waited on the commit for as long as TCP does (minutes)
    finally:
        freeze(own_pg, signal.SIGCONT)
    store = PgStore(own_pg.url())
    await store.open()
    try:   # what was never acknowledged as stored either landed or not; the board's state is the store's
        jobs, tasks = await store.load_active()
        assert len(jobs) == 1 and {t.state for t in tasks} <= {TaskState.QUEUED, TaskState.LEASED}
    finally:
        await store.close()
