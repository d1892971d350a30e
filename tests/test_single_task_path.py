"""The short path of one task (submit -> lease -> result -> job done): each cut keeps what a client sees.

A submitter waiting on a job (``GET /v1/jobs/{id}?wait=``) is handed the view committed as the job finished,
from memory, instead of reading it back from the store behind the commits that follow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.pg_store import PgStore
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.requirements import Capabilities
from security.errors import BadRequest
from security.identity import Identity
from security.records import SignedRecord


def manifest(n: int) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "short"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n}}})


class Short:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.clock, self.config = tmp, FakeClock(1_000_000.0), HubConfig(expiry_interval_s=3600)
        self.board = Board(SqliteStore(tmp / "b.db"), self.config, self.clock)
        self.user, self.agent = Identity.generate(), Identity.generate()

    async def submit(self, n: int) -> str:
        job, _ = await self.board.submit(make_envelope(self.user, manifest(n)), self.user.id)
        return job.id

    async def run_all(self) -> None:
        for task in await self.board.lease(self.agent.id, 8, 0):
            record = SignedRecord.sign(self.agent, {
                "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                "attempt": task.attempt, "agent_id": self.agent.id, "status": "ok", "values": {}})
            await self.board.accept(self.agent.id, [record])


@pytest.fixture
async def short(tmp_path: Path) -> AsyncIterator[Short]:
    s = Short(tmp_path)
    await s.board.start()
    await s.board.register_agent(s.agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    yield s
    await s.board.stop()


async def test_a_job_waiter_is_handed_the_final_view_as_committed(short: Short) -> None:
    job_id = await short.submit(2)
    waiters = [asyncio.create_task(short.board.wait_job(job_id, 30)) for _ in range(2)]
    await asyncio.sleep(0)   # both are waiting before the job finishes
    await short.run_all()
    finals = await asyncio.gather(*waiters)
    assert finals[0] is not None and finals[0]["state"] == "succeeded" and finals[0]["tasks"] == {"done": 2}
    assert finals[1] == finals[0]
    # what the store holds afterwards (a fresh board reads it back) is what the waiters were told
    await short.board.stop()
    short.board = Board(SqliteStore(short.tmp / "b.db"), short.config, short.clock)
    await short.board.start()
    assert await short.board.job_view(job_id) == finals[0]


async def test_a_cancelled_jobs_waiter_is_told_it_was_cancelled(short: Short) -> None:
    job_id = await short.submit(3)
    waiter = asyncio.create_task(short.board.wait_job(job_id, 30))
    await asyncio.sleep(0)
    await short.board.cancel(job_id, short.user.id)
    final = await waiter
    assert final is not None and final["state"] == "cancelled"
    assert final == await short.board.job_view(job_id)


async def test_a_job_still_running_at_the_deadline_gives_its_waiter_nothing(short: Short) -> None:
    job_id = await short.submit(1)
    assert await short.board.wait_job(job_id, 0.05) is None
    await short.run_all()
    assert await short.board.wait_job(job_id, 5) is None     # already finished: the caller reads the view
    assert (await short.board.job_view(job_id))["state"] == "succeeded"


async def test_a_jobs_first_lease_makes_the_lease_and_the_jobs_start_durable(short: Short) -> None:
    # Both writes are queued in one turn so that they usually share a group commit; whether they do depends on
    # when the store's writer thread wakes (a busy machine: two commits), so that is measured, not asserted here.
    job_id = await short.submit(2)
    [task] = await short.board.lease(short.agent.id, 1, 0)
    await short.board.leases_stored()   # the reply went out with the commits in flight (hub/lease_writes.py)
    assert (await short.board.job_view(job_id))["state"] == "running"
    # both are durable: a fresh board reads them back
    await short.board.stop()
    short.board = Board(SqliteStore(short.tmp / "b.db"), short.config, short.clock)
    await short.board.start()
    assert (await short.board.job_view(job_id))["state"] == "running"
    assert (await short.board.store.get_tasks(job_id))[task.idx].lease_id == task.lease_id


async def test_a_new_job_costs_one_store_round_trip(short: Short) -> None:
    store = short.board.store
    assert isinstance(store, SqliteStore)
    before = store.commits
    job_id = await short.submit(2)
    assert store.commits == before + 1          # the insert only: no read of the job id first
    assert [t.job_id for t in await store.get_tasks(job_id)] == [job_id, job_id]


async def test_a_finished_job_submitted_again_is_answered_from_the_store(short: Short) -> None:
    envelope = make_envelope(short.user, manifest(2))
    job, created = await short.board.submit(envelope, short.user.id)
    await short.run_all()
    assert created and not short.board.is_active(job.id)      # finished: out of memory, in the store
    again, created_again = await short.board.submit(envelope, short.user.id)
    assert not created_again and again.id == job.id and again.state.value == "succeeded"
    # even where its manifest would no longer pass (here: the hub's limit on tasks per job went down)
    await short.board.stop()
    short.board = Board(SqliteStore(short.tmp / "b.db"), HubConfig(expiry_interval_s=3600, max_tasks_per_job=1),
                        short.clock)
    await short.board.start()
    third, created_third = await short.board.submit(envelope, short.user.id)
    assert not created_third and third.id == job.id and third.state.value == "succeeded"
    assert len(await short.board.store.list_jobs()) == 1


async def test_a_new_job_over_the_hubs_limits_is_still_refused(tmp_path: Path) -> None:
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(expiry_interval_s=3600, max_tasks_per_job=1))
    await board.start()
    try:
        user = Identity.generate()
        with pytest.raises(BadRequest, match="tasks"):
            await board.submit(make_envelope(user, manifest(2)), user.id)
        assert await board.store.list_jobs() == []
    finally:
        await board.stop()


async def test_twin_submits_of_one_envelope_make_one_job(short: Short) -> None:
    envelope = make_envelope(short.user, manifest(1))
    (a, a_new), (b, b_new) = await asyncio.gather(short.board.submit(envelope, short.user.id),
                                                  short.board.submit(envelope, short.user.id))
    assert a.id == b.id and sorted([a_new, b_new]) == [False, True]
    assert len(await short.board.store.list_jobs()) == 1 and short.board.is_active(a.id)


async def test_on_postgresql_a_finished_job_submitted_again_is_answered_from_the_store(pg: str) -> None:
    """The failed insert of a known job id rolls back alone there too (its batch is retried in savepoints)."""
    board = Board(PgStore(pg), HubConfig(expiry_interval_s=3600), FakeClock(1_000_000.0))
    await board.start()
    try:
        user, agent = Identity.generate(), Identity.generate()
        await board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        envelope = make_envelope(user, manifest(1))
        job, created = await board.submit(envelope, user.id)
        [task] = await board.lease(agent.id, 1, 0)
        await board.accept(agent.id, [SignedRecord.sign(agent, {
            "task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id, "attempt": task.attempt,
            "agent_id": agent.id, "status": "ok", "values": {}})])
        again, created_again = await board.submit(envelope, user.id)
        assert created and not created_again and again.id == job.id and again.state.value == "succeeded"
    finally:
        await board.stop()
