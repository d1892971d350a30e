"""The contract every board store keeps, run against each store the factory can build.

Each backend is one entry in BACKENDS: a URL for a fresh database and the error its driver raises
on a key conflict; every test here runs against each (SQLite, and PostgreSQL on a private server
started for the session: tests/pgserver.py). Here: agents, submitters, jobs, tasks, leases, results and
durability; the records kept beside them (blob ownership, admission tokens, trust, best tasks, the status
history, a committed job's lists) are in tests/test_store_contract_records.py, on the same backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hub.records import AgentRow, JobRow, JobState, ResultRow, TaskRow, TaskState
from hub.store import Store
from hub.stores import create_store
from security.identity import Identity
from security.records import SignedRecord


@dataclass(frozen=True)
class Backend:
    url: Callable[[pytest.FixtureRequest], str]   # a URL naming a fresh, empty database of this test's own
    conflict: type[Exception]                     # what a duplicate key raises (a second result for a task)


BACKENDS = [
    pytest.param(Backend(lambda request: "sqlite:///contract.db", sqlite3.IntegrityError), id="sqlite"),
    # a database of its own on the session's private server (tests/pgserver.py; skips where none can start)
    pytest.param(Backend(lambda request: request.getfixturevalue("pg"), asyncpg.UniqueViolationError),
                 id="postgresql"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def make(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Store]:
    """A new store object for the same database on each call (a hub restart)."""
    url = backend.url(request)
    return lambda: create_store(url, tmp_path / "default.db")


@contextlib.asynccontextmanager
async def opened(make: Callable[[], Store]) -> AsyncIterator[Store]:
    store = make()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


SIGNER = Identity.generate()


def job(job_id: str, created_at: float = 1000.0, state: JobState = JobState.QUEUED, n_tasks: int = 2,
        inputs: dict[str, Any] | None = None) -> JobRow:
    envelope = SignedRecord.sign(SIGNER, {"manifest": {"spec": {"task": "sleep", "inputs": inputs or {}}}}).to_wire()
    return JobRow(id=job_id, name=f"name-{job_id}", submitter_id=SIGNER.id, kind="sleep", priority=3, state=state,
                  created_at=created_at, n_tasks=n_tasks, envelope=envelope, requires={"device": "cpu"},
                  timeout_s=60.0, max_attempts=3, deadline_at=created_at + 3600, labels={"team": "a"})


def tasks(row: JobRow) -> list[TaskRow]:
    return [TaskRow(id=f"{row.id}.{i}", job_id=row.id, idx=i, params={"seconds": float(i), "blob": b"\x00\x01"},
                    updated_at=row.created_at) for i in range(row.n_tasks)]


def result(task: TaskRow, outputs: dict[str, Any] | None = None, accepted_at: float = 2000.0) -> ResultRow:
    record = SignedRecord.sign(SIGNER, {"task_id": task.id, "status": "ok", "outputs": outputs or {}}).to_wire()
    return ResultRow(task_id=task.id, job_id=task.job_id, attempt=task.attempt, agent_id="agent-1", record=record,
                     digest=hashlib.sha256(record["payload"]).hexdigest(), accepted_at=accepted_at)


def done(task: TaskRow) -> TaskRow:
    return replace(task, state=TaskState.DONE, progress=1.0, updated_at=task.updated_at + 5)


# -- every method ------------------------------------------------------------------------------


async def test_agents_are_added_then_updated_but_keep_their_key_and_owner(make: Callable[[], Store]) -> None:
    async with opened(make) as store:
        assert await store.list_agents() == []
        first = AgentRow("a1", "ed25519:one", "box", {"cpu": {"cores": 4}}, registered_at=10.0, last_seen=10.0,
                         owner="alice")
        await store.upsert_agent(first)
        await store.upsert_agent(AgentRow("a2", "ed25519:two", "other", {}, registered_at=11.0, last_seen=11.0))
        again = AgentRow("a1", "ed25519:forged", "renamed", {"cpu": {"cores": 8}}, registered_at=99.0, last_seen=20.0,
                         owner="mallory")
        await store.upsert_agent(again)
        agents = {a.id: a for a in await store.list_agents()}
    assert agents["a1"] == AgentRow("a1", "ed25519:one", "renamed", {"cpu": {"cores": 8}}, 10.0, 20.0, "alice")
    assert agents["a2"].name == "other" and len(agents) == 2


async def test_submitters_are_listed_oldest_first_renamed_and_removed(make: Callable[[], Store]) -> None:
    async with opened(make) as store:
        await store.add_submitter("k1", "ed25519:one", "ann")
        await store.add_submitter("k2", "ed25519:two", "bob")
        await store.add_submitter("k1", "ed25519:one", "ann b.")
        assert await store.list_submitters() == [("k1", "ed25519:one", "ann b."), ("k2", "ed25519:two", "bob")]
        assert await store.remove_submitter("k1") is True
        assert await store.remove_submitter("k1") is False
        assert await store.list_submitters() == [("k2", "ed25519:two", "bob")]


async def test_a_created_job_reads_back_exactly(make: Callable[[], Store]) -> None:
    row = job("j1")
    async with opened(make) as store:
        await store.create_job(row, tasks(row))
        assert await store.get_job("j1") == row
        assert await store.get_tasks("j1") == tasks(row)
        assert await store.get_job("missing") is None
        assert await store.get_tasks("missing") == [] and await store.get_results("missing") == []


async def test_creating_a_job_twice_fails_and_changes_nothing(make: Callable[[], Store], backend: Backend) -> None:
    row = job("j1")
    async with opened(make) as store:
        await store.create_job(row, tasks(row))
        with pytest.raises(backend.conflict):
            await store.create_job(replace(row, name="other", n_tasks=3), tasks(replace(row, n_tasks=3)))
        assert await store.get_job("j1") == row and len(await store.get_tasks("j1")) == 2


async def test_leases_tasks_and_job_states_are_saved(make: Callable[[], Store]) -> None:
    row = job("j1")
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        await store.save_leases([(t0.id, "L1", "agent-1", 2, 5000.0)])
        leased = (await store.get_tasks("j1"))[0]
        assert (leased.state, leased.lease_id, leased.agent_id, leased.attempt, leased.lease_expires_at) == (
            TaskState.LEASED, "L1", "agent-1", 2, 5000.0)

        failed = replace(t1, state=TaskState.FAILED, attempt=3, error="boom", error_class="permanent",
                         progress=0.5, updated_at=1234.0, checkpoint=sha("ckpt"),
                         checkpoint_record=SignedRecord.sign(SIGNER, {"sha256": sha("ckpt")}).to_wire())
        running = replace(row, state=JobState.RUNNING)
        await store.save_tasks([failed], [running])
        assert (await store.get_tasks("j1"))[1] == failed
        assert (await store.get_job("j1")) == running
        await store.save_tasks([replace(failed, progress=0.75)])  # jobs are optional
        assert (await store.get_tasks("j1"))[1].progress == 0.75


async def test_a_lease_write_carries_the_jobs_it_starts_and_takes_its_place_when_called(
        make: Callable[[], Store]) -> None:
    row = job("j1")
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        leasing = store.save_leases([(t0.id, "L1", "agent-1", 0, 5000.0)], [replace(row, state=JobState.RUNNING)])
        # queued when called: a write asked for after it, awaited first, still lands after it
        await store.save_tasks([replace(t0, state=TaskState.DONE, lease_id="L1", agent_id="agent-1")])
        await leasing
        assert (await store.get_tasks("j1"))[0].state == TaskState.DONE
        assert (await store.get_job("j1")) == replace(row, state=JobState.RUNNING)


async def test_results_are_accepted_with_their_tasks_and_job(make: Callable[[], Store]) -> None:
    row = job("j1")
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        finished = replace(row, state=JobState.SUCCEEDED, finished_at=3000.0)
        await store.accept_results([result(t0), result(t1)], [done(t0), done(t1)], [finished])
        assert await store.get_results("j1") == [result(t0), result(t1)]
        assert await store.get_tasks("j1") == [done(t0), done(t1)]
        assert await store.get_job("j1") == finished


async def test_a_second_result_for_a_task_fails_and_changes_nothing(make: Callable[[], Store],
                                                                     backend: Backend) -> None:
    row = job("j1")
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        await store.accept_results([result(t0)], [done(t0)], [])
        with pytest.raises(backend.conflict):
            # t1's result rides in the same write as the duplicate: it is refused with it
            await store.accept_results([result(t1), result(t0, accepted_at=9.0)], [done(t1)],
                                       [replace(row, state=JobState.SUCCEEDED)])
        assert await store.get_results("j1") == [result(t0)]
        assert await store.get_tasks("j1") == [done(t0), t1]
        assert await store.get_job("j1") == row


async def test_load_active_is_the_queued_and_running_jobs_with_all_their_tasks(make: Callable[[], Store]) -> None:
    queued, running, over = job("j1", 1.0), job("j2", 2.0), job("j3", 3.0)
    async with opened(make) as store:
        for row in (queued, running, over):
            await store.create_job(row, tasks(row))
        await store.save_tasks([done(t) for t in tasks(running)[:1]], [replace(running, state=JobState.RUNNING)])
        await store.save_tasks([done(t) for t in tasks(over)], [replace(over, state=JobState.SUCCEEDED)])
        jobs, active = await store.load_active()
    assert sorted(j.id for j in jobs) == ["j1", "j2"]
    assert [t.id for t in active] == ["j1.0", "j1.1", "j2.0", "j2.1"]
    assert active[2].state == TaskState.DONE and active[3].state == TaskState.QUEUED


async def test_list_jobs_is_newest_first_by_state_and_limited(make: Callable[[], Store]) -> None:
    rows = [job(f"j{i}", created_at=float(i)) for i in range(5)]
    async with opened(make) as store:
        for row in rows:
            await store.create_job(row, tasks(row))
        await store.save_tasks([], [replace(rows[1], state=JobState.CANCELLED), replace(rows[3],
                                                                                      state=JobState.CANCELLED)])
        assert [j.id for j in await store.list_jobs()] == ["j4", "j3", "j2", "j1", "j0"]
        assert [j.id for j in await store.list_jobs(limit=2)] == ["j4", "j3"]
        assert [j.id for j in await store.list_jobs(JobState.CANCELLED)] == ["j3", "j1"]
        assert [j.id for j in await store.list_jobs(JobState.QUEUED, limit=1)] == ["j4"]
        assert await store.list_jobs(JobState.FAILED) == []


async def test_referenced_blobs_are_inputs_outputs_and_checkpoints(make: Callable[[], Store]) -> None:
    row = job("j1", inputs={"weights": {"blob": sha("in")}, "inline": {"path": "x.pt"}, "bad": "text"})
    t0, t1 = tasks(row)
    async with opened(make) as store:
        assert await store.referenced_blobs() == set()
        await store.create_job(row, [t0, t1])
        await store.accept_results([result(t0, {"y": {"sha256": sha("out")}, "z": {"name": "no digest"}})],
                                   [done(t0)], [])
        await store.save_tasks([replace(t1, checkpoint=sha("ckpt"))])
        assert await store.referenced_blobs() == {sha("in"), sha("out"), sha("ckpt")}


# -- durability ----------------------------------------------------------------------------------


async def test_everything_written_is_back_after_a_restart(make: Callable[[], Store]) -> None:
    row, other = job("j1"), job("j2", created_at=2000.0)
    t0, t1 = tasks(row)
    agent = AgentRow("a1", "ed25519:one", "box", {"gpus": []}, registered_at=10.0, last_seen=12.0)
    async with opened(make) as store:
        await store.upsert_agent(agent)
        await store.add_submitter("k1", "ed25519:one", "ann")
        await store.create_job(row, [t0, t1])
        await store.create_job(other, tasks(other))
        await store.save_leases([(t1.id, "L1", "a1", 1, 5000.0)])
        await store.accept_results([result(t0)], [done(t0)], [replace(row, state=JobState.RUNNING)])
        before = (await store.list_jobs(), await store.get_tasks("j1"), await store.get_results("j1"),
                  await store.load_active(), await store.referenced_blobs())
    async with opened(make) as store:
        assert await store.list_agents() == [agent]
        assert await store.list_submitters() == [("k1", "ed25519:one", "ann")]
        after = (await store.list_jobs(), await store.get_tasks("j1"), await store.get_results("j1"),
                 await store.load_active(), await store.referenced_blobs())
    assert after == before
    assert after[1][1].state == TaskState.LEASED and after[1][1].lease_id == "L1"


async def test_a_result_recorded_before_a_restart_is_a_duplicate_after_it(make: Callable[[], Store],
                                                                          backend: Backend) -> None:
    row = job("j1")
    t0, t1 = tasks(row)
    first = result(t0)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        await store.accept_results([first], [done(t0)], [])
    async with opened(make) as store:
        # the board recognises a re-send by its digest among the stored results
        assert {r.task_id: r.digest for r in await store.get_results("j1")} == {t0.id: first.digest}
        with pytest.raises(backend.conflict):
            await store.accept_results([result(t0, accepted_at=5000.0)], [done(t0)], [])
        assert await store.get_results("j1") == [first]


async def test_concurrent_writers_all_land_and_one_failure_spoils_none(make: Callable[[], Store],
                                                                        backend: Backend) -> None:
    writers, per_writer = 8, 12
    dup = job("dup")

    async def writer(w: int, store: Store) -> None:
        for i in range(per_writer):
            row = job(f"w{w}-{i}", created_at=float(w * 100 + i), n_tasks=1)
            await store.create_job(row, tasks(row))
            await store.add_submitter(f"k{w}-{i}", "ed25519:x", f"s{w}")
            if i % 4 == 0:
                await store.upsert_agent(AgentRow(f"a{w}", "ed25519:x", f"agent {i}", {}, 1.0, float(i)))
            await asyncio.sleep(0)

    async def clash(store: Store) -> None:
        with pytest.raises(backend.conflict):  # the duplicate job, written amid the others
            await store.create_job(dup, tasks(dup))

    async with opened(make) as store:
        await store.create_job(dup, tasks(dup))
        await asyncio.gather(*(writer(w, store) for w in range(writers)), clash(store), clash(store))
    async with opened(make) as store:
        jobs = {j.id for j in await store.list_jobs(limit=10_000)}
        submitters = await store.list_submitters()
        agents = {a.id: a for a in await store.list_agents()}
    assert jobs == {"dup"} | {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)}
    assert len(submitters) == writers * per_writer
    assert sorted(agents) == [f"a{w}" for w in range(writers)]
    last = max(i for i in range(per_writer) if i % 4 == 0)  # each writer's own updates land in order
    assert all((a.name, a.last_seen) == (f"agent {last}", float(last)) for a in agents.values())
