"""The board's scheduling rules against a real SQLite store, with a controllable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.records import JobState, TaskRow, TaskState
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.protocol_upkeep import HeartbeatLease, LossReason, LostLease
from jobs.requirements import Capabilities
from security.errors import Conflict, Forbidden
from security.identity import Identity
from security.records import SignedRecord


def manifest(n: int = 1, retries: int = 2, **spec: Any) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "t"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n},
                                        "policy": {"retries": retries}, **spec}})


def task_of(fx: Fixture, task_id: str) -> TaskRow:
    task = fx.board.view.task(task_id)
    assert task is not None
    return task


class Fixture:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = FakeClock(1_000_000.0)
        self.config = HubConfig(lease_ttl_s=10, retry_backoff_s=0, expiry_interval_s=3600)
        self.board = Board(SqliteStore(tmp / "b.db"), self.config, self.clock)
        self.user = Identity.generate()
        self.agents = [Identity.generate(), Identity.generate()]

    async def restart(self) -> None:
        await self.board.stop()
        self.board = Board(SqliteStore(self.tmp / "b.db"), self.config, self.clock)
        await self.board.start()

    async def submit(self, m: Manifest) -> str:
        job, created = await self.board.submit(make_envelope(self.user, m), self.user.id)
        assert created
        return job.id

    async def lease(self, agent: Identity, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(agent.id, slots, 0)

    def result(self, agent: Identity, task: Assignment, status: str = "ok", **extra: Any) -> SignedRecord:
        payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                   "attempt": task.attempt, "agent_id": agent.id, "status": status, **extra}
        return SignedRecord.sign(agent, payload)


@pytest.fixture
async def fx(tmp_path: Path) -> AsyncIterator[Fixture]:
    f = Fixture(tmp_path)
    await f.board.start()
    for agent in f.agents:
        await f.board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    yield f
    await f.board.stop()


async def test_lease_result_completes_job_exactly_once(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(2))
    tasks = await fx.lease(fx.agents[0], slots=5)
    assert [t.idx for t in tasks] == [0, 1]
    records = [fx.result(fx.agents[0], t) for t in tasks]
    outcomes = await fx.board.accept(fx.agents[0].id, records)
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    view = await fx.board.job_view(job_id)
    assert view["state"] == "succeeded" and view["tasks"] == {"done": 2}
    # The same results again (a lost ack): acknowledged, never counted twice.
    again = await fx.board.accept(fx.agents[0].id, records)
    assert [o.status for o in again] == ["duplicate", "duplicate"]
    assert len(await fx.board.store.get_results(job_id)) == 2


async def test_resubmitting_the_same_envelope_is_idempotent(fx: Fixture) -> None:
    envelope = make_envelope(fx.user, manifest(3))
    first, created = await fx.board.submit(envelope, fx.user.id)
    second, created_again = await fx.board.submit(envelope, fx.user.id)
    assert created and not created_again and first.id == second.id
    assert len(await fx.board.store.list_jobs()) == 1


async def test_manifest_signed_by_someone_else_is_refused(fx: Fixture) -> None:
    with pytest.raises(Forbidden, match="signed by"):
        await fx.board.submit(make_envelope(Identity.generate(), manifest()), fx.user.id)


async def test_expired_lease_is_requeued_and_late_result_rejected(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(1))
    [task] = await fx.lease(fx.agents[0])
    fx.clock.now += 11
    await fx.board.sweep()
    [row] = await fx.board.store.get_tasks(job_id)
    assert row.state == TaskState.QUEUED and row.attempt == 2 and row.error_class == "agent_lost"
    [again] = await fx.lease(fx.agents[1])
    assert again.attempt == 2
    [late] = await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], task)])
    assert late.status == "rejected" and isinstance(late.error, Conflict) and late.error.code == "lease_expired"
    [ok] = await fx.board.accept(fx.agents[1].id, [fx.result(fx.agents[1], again)])
    assert ok.status == "accepted"
    [row] = await fx.board.store.get_tasks(job_id)
    assert row.state == TaskState.DONE and row.agent_id == fx.agents[1].id


async def test_heartbeat_extends_lease_and_reports_lost_ones(fx: Fixture) -> None:
    await fx.submit(manifest(1))
    [task] = await fx.lease(fx.agents[0])
    fx.clock.now += 8
    reply = await fx.board.heartbeat(fx.agents[0].id, [HeartbeatLease(task.task_id, task.lease_id, 0.5)])
    assert reply.lost == ()
    fx.clock.now += 8   # 16 s after the lease, 8 s after the heartbeat: still valid
    await fx.board.sweep()
    assert task_of(fx, task.task_id).state == TaskState.LEASED
    assert task_of(fx, task.task_id).progress == 0.5
    reply = await fx.board.heartbeat(fx.agents[1].id, [HeartbeatLease(task.task_id, task.lease_id)])
    assert reply.lost == (LostLease(task.task_id, LossReason.LOST),)


async def test_result_from_the_wrong_agent_is_forbidden(fx: Fixture) -> None:
    await fx.submit(manifest(1))
    [task] = await fx.lease(fx.agents[0])
    # Signed by agent 1 but sent by agent 0: the signer must be the caller.
    [o] = await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[1], task)])
    assert o.status == "rejected" and isinstance(o.error, Forbidden)
    # Agent 1 claims agent 0's lease.
    [o] = await fx.board.accept(fx.agents[1].id, [fx.result(fx.agents[1], task)])
    assert o.status == "rejected" and o.error is not None and o.error.code == "not_your_lease"
    assert task_of(fx, task.task_id).state == TaskState.LEASED


async def test_transient_failures_retry_then_fail_and_permanent_fails_once_confirmed(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(2, retries=1))
    tasks = await fx.lease(fx.agents[0], 2)
    outcomes = await fx.board.accept(fx.agents[0].id, [
        fx.result(fx.agents[0], tasks[0], "failed", error_class="oom", error="boom"),
        fx.result(fx.agents[0], tasks[1], "failed", error_class="invalid_params", error="bad")])
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    await fx.board.sweep()
    # The oom is retried; the invalid_params report waits for a second agent to confirm it.
    retry, second = await fx.lease(fx.agents[1], 2)
    assert (retry.idx, retry.attempt, second.idx, second.attempt) == (0, 2, 1, 1)
    await fx.board.accept(fx.agents[1].id, [fx.result(fx.agents[1], retry, "failed", error_class="oom", error="x"),
                                            fx.result(fx.agents[1], second, "failed", error_class="invalid_params",
                                                      error="bad")])
    view = await fx.board.job_view(job_id)
    assert view["state"] == "failed" and view["tasks"] == {"failed": 2}
    assert "2 of 2 tasks failed" in view["error"]


async def test_a_held_back_report_is_run_again_by_its_reporter_once_no_other_agent_is_connected(
        fx: Fixture) -> None:
    job_id = await fx.submit(manifest(1))
    [task] = await fx.lease(fx.agents[0])
    await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], task, "failed", error_class="invalid_params",
                                                      error="bad")])
    await fx.board.sweep()
    assert await fx.lease(fx.agents[0]) == []   # held back: agent 1 (connected) could confirm it
    fx.clock.now += 3600                        # agent 1 went away without ever asking for work
    [again] = await fx.lease(fx.agents[0])      # nobody else can lift the hold: the reporter runs it again
    assert again.task_id == task.task_id
    await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], again, "failed", error_class="invalid_params",
                                                      error="bad")])
    view = await fx.board.job_view(job_id)
    assert view["state"] == "failed" and view["tasks"] == {"failed": 1}


async def test_requirements_are_matched_and_explained(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(1, requires={"device": "gpu", "min_vram_gb": 16}))
    assert await fx.lease(fx.agents[0]) == []
    view = await fx.board.job_view(job_id)
    assert any("min_vram_gb 16" in r or "a GPU" in r for r in view["waiting_because"])
    big = Identity.generate()
    await fx.board.register_agent(big.public, "big", Capabilities.from_dict({"kinds": ["sleep"], "gpus": [
        {"name": "A100", "backend": "cuda", "vram_gb": 40, "compute_capability": "8.0"}]}))
    [task] = await fx.lease(big)
    assert task.job_id == job_id


async def test_priority_orders_jobs(fx: Fixture) -> None:
    low = await fx.submit(manifest(1, policy={"priority": -5}))
    high = await fx.submit(manifest(1, policy={"priority": 5}))
    first = await fx.lease(fx.agents[0])
    second = await fx.lease(fx.agents[0])
    assert [first[0].job_id, second[0].job_id] == [high, low]


async def test_cancel_only_by_owner(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(3))
    await fx.lease(fx.agents[0])
    with pytest.raises(Forbidden):
        await fx.board.cancel(job_id, Identity.generate().id)
    await fx.board.cancel(job_id, fx.user.id)
    view = await fx.board.job_view(job_id)
    assert view["state"] == "cancelled" and view["tasks"] == {"cancelled": 3}
    assert await fx.lease(fx.agents[1]) == []


async def test_restart_keeps_everything_acknowledged(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(3))
    tasks = await fx.lease(fx.agents[0], 2)
    await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], tasks[0])])
    await fx.restart()
    view = await fx.board.job_view(job_id)
    assert view["state"] == JobState.RUNNING.value
    assert view["tasks"] == {"done": 1, "leased": 1, "queued": 1}
    # The surviving lease still accepts its result; the queued task is leased again.
    [o] = await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], tasks[1])])
    assert o.status == "accepted"
    [last] = await fx.lease(fx.agents[1])
    await fx.board.accept(fx.agents[1].id, [fx.result(fx.agents[1], last)])
    assert (await fx.board.job_view(job_id))["state"] == "succeeded"
    # A re-send of a result of the finished job is still recognised as a duplicate.
    [dup] = await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], tasks[0])])
    assert dup.status == "duplicate"


async def test_concurrent_results_finishing_a_job_settle_once(fx: Fixture) -> None:
    """Several result batches in flight at once, the last of which ends the job (a race that once
    dropped the job twice)."""
    import asyncio

    job_id = await fx.submit(manifest(6))
    tasks = await fx.lease(fx.agents[0], 6)
    outcomes = await asyncio.gather(*(fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], t)])
                                      for t in tasks))
    assert [o.status for [o] in outcomes] == ["accepted"] * 6
    assert (await fx.board.job_view(job_id))["state"] == "succeeded"
    assert len(await fx.board.store.get_results(job_id)) == 6


async def test_queued_tasks_fail_when_the_deadline_passes(fx: Fixture) -> None:
    job_id = await fx.submit(manifest(2, policy={"deadline": "5s"}))
    [task] = await fx.lease(fx.agents[0], 1)
    fx.clock.now += 6   # past the deadline, within the 10 s lease
    await fx.board.sweep()
    assert task_of(fx, f"{job_id}.1").state == TaskState.FAILED
    assert task_of(fx, task.task_id).state == TaskState.LEASED  # running work may still finish
    await fx.board.accept(fx.agents[0].id, [fx.result(fx.agents[0], task)])
    view = await fx.board.job_view(job_id)
    assert view["state"] == "failed" and "deadline passed" in view["error"]
