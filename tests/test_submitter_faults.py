"""Failures classified by who caused them (issue #15 part 7), on a real Board over SQLite: one agent's
``invalid_params`` report cannot sink a job; two different agents agreeing fail the task with the
submitter's error; such reports never count against the reporting volunteer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord


def manifest(n: int = 1, retries: int = 10) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "faults"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n},
                                        "policy": {"retries": retries}}})


class Fleet:
    """A board with a submitter and three agents: a liar and two honest ones."""

    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock(1_000_000.0)
        # quarantine_min_attempts 1: a single failure the quarantine blamed would show at once
        self.board = Board(SqliteStore(tmp / "b.db"), HubConfig(retry_backoff_s=0, expiry_interval_s=3600,
                                                                quarantine_min_attempts=1), self.clock)
        self.user = Identity.generate()
        self.liar, self.honest, self.other = Identity.generate(), Identity.generate(), Identity.generate()

    async def submit(self, m: Manifest) -> str:
        job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
        return job.id

    async def lease(self, agent: Identity) -> list[Assignment]:
        return await self.board.lease(agent.id, 4, 0)

    async def report(self, agent: Identity, task: Assignment, status: str = "ok", **extra: Any) -> str:
        record = SignedRecord.sign(agent, {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                                           "attempt": task.attempt, "agent_id": agent.id, "status": status, **extra})
        [outcome] = await self.board.accept(agent.id, [record])
        return outcome.status.value


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    await f.board.start()
    for agent in (f.liar, f.honest, f.other):
        await f.board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    yield f
    await f.board.stop()


async def test_one_volunteer_answering_invalid_params_cannot_sink_a_job(fleet: Fleet) -> None:
    job_id = await fleet.submit(manifest(1, retries=10))
    [task] = await fleet.lease(fleet.liar)
    assert await fleet.report(fleet.liar, task, "failed", error_class="invalid_params", error="seconds: lies") \
        == "accepted"
    view = await fleet.board.job_view(job_id)
    assert view["state"] in ("queued", "running") and view["tasks"] == {"queued": 1}
    held = fleet.board.view.task(task.task_id)
    assert held is not None and "waiting for another agent to confirm" in str(held.error)
    # The liar cannot confirm its own report: the task is held back from it.
    assert await fleet.lease(fleet.liar) == []
    [again] = await fleet.lease(fleet.honest)
    assert again.task_id == task.task_id and again.attempt == task.attempt   # no attempt used by the lie
    assert await fleet.report(fleet.honest, again, values={"slept": 0.0}) == "accepted"
    view = await fleet.board.job_view(job_id)
    assert view["state"] == "succeeded"
    # Never against the volunteer: no public error, no quarantine strike.
    liar = fleet.board.agents[fleet.liar.id]
    assert liar.failed == 0
    assert not fleet.board.quarantine.quarantined(fleet.liar.id)
    assert all(r["recent_failures"] == 0 for r in fleet.board.quarantine.snapshot() if r["agent"] == fleet.liar.id)


async def test_a_genuinely_bad_job_fails_once_two_agents_agree_with_the_submitters_error(fleet: Fleet) -> None:
    job_id = await fleet.submit(manifest(1, retries=10))
    [task] = await fleet.lease(fleet.honest)
    await fleet.report(fleet.honest, task, "failed", error_class="invalid_params", error="seconds: must be >= 0")
    [again] = await fleet.lease(fleet.other)
    await fleet.report(fleet.other, again, "failed", error_class="invalid_params", error="seconds: must be >= 0")
    view = await fleet.board.job_view(job_id)
    assert view["state"] == "failed"
    assert "seconds: must be >= 0" in view["error"]
    [row] = await fleet.board.store.get_tasks(job_id)
    assert row.error_class == "invalid_params" and row.attempt == 1   # two reports, not ten retries
    for agent in (fleet.honest, fleet.other):
        assert fleet.board.agents[agent.id].failed == 0


async def test_unsupported_is_a_submitter_fault_too_and_survives_a_restart_safely(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    await f.board.start()
    try:
        for agent in (f.liar, f.honest):
            await f.board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
        job_id = await f.submit(manifest(1, retries=0))
        [task] = await f.lease(f.liar)
        await f.report(f.liar, task, "failed", error_class="unsupported", error="refused model")
        await f.board.stop()
        # After a restart the report is forgotten: the task can only get slower to fail, never fail wrongly.
        f.board = Board(SqliteStore(tmp_path / "b.db"), f.board.config, f.clock)
        await f.board.start()
        [again] = await f.lease(f.honest)
        assert again.task_id == task.task_id
        assert await f.report(f.honest, again, values={}) == "accepted"
        assert (await f.board.job_view(job_id))["state"] == "succeeded"
    finally:
        await f.board.stop()


async def test_on_a_board_where_no_other_agent_could_run_it_the_report_stands(tmp_path: Path) -> None:
    # A standalone `panal up` has one agent: waiting for a second opinion would hang the job forever.
    f = Fleet(tmp_path)
    await f.board.start()
    try:
        await f.board.register_agent(f.honest.public, "only", Capabilities.from_dict({"kinds": ["sleep"]}))
        await f.board.register_agent(f.other.public, "gpu-less", Capabilities.from_dict({"kinds": ["matmul"]}))
        job_id = await f.submit(manifest(1, retries=5))
        [task] = await f.lease(f.honest)
        await f.report(f.honest, task, "failed", error_class="invalid_params", error="seconds: must be >= 0")
        view = await f.board.job_view(job_id)
        assert view["state"] == "failed" and "seconds: must be >= 0" in view["error"]
    finally:
        await f.board.stop()
