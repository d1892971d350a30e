"""Each plugin shape of the board, written against hub.protocols alone, taking effect on a real Board + SQLite.

The doubles here import only the protocol module, the records the protocols speak of and the
board's public API: if one of them needs more, the seam is in the wrong place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.client.submitting import make_envelope
from hub.board import AgentState, Board
from hub.config import HubConfig
from hub.protocols import (
    ACCEPT,
    PENDING,
    BoardObserver,
    DispatchPolicy,
    DispatchView,
    Event,
    LeaseGate,
    ResultValidator,
    Verdict,
)
from hub.records import JobRow, ResultRow, TaskRow, TaskState
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# -- the doubles ------------------------------------------------------------------------------------
class LastFirst:
    """A policy: the last queued task of the first waiting job first (priority-fifo takes the first)."""

    name = "last-first"
    predictor = None

    def __init__(self) -> None:
        self.settled: list[str] = []

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        queues = view.queues
        for job_id in queues.waiting():
            chosen = list(reversed(queues.peek(job_id, queues.queued(job_id))))[:slots]
            queues.take(job_id, chosen)
            return chosen
        return []

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        self.settled.append(task.id)


class Refuse:
    """A lease gate that gives one agent no work."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id

    def refuse(self, agent: AgentState) -> str | None:
        return "on a break" if agent.row.id == self.agent_id else None


class Recorder:
    """An observer of settled attempts and a listener of board events."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, bool, str | None]] = []
        self.events: list[str] = []

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        self.attempts.append((agent_id, task.id, ok, failure))

    def on_event(self, event: Event) -> None:
        self.events.append(str(event["type"]))


class TwoAgentsAgree:
    """A validator: a result waits for a replica (a task of the same job with the same parameters)
    run by another agent; a second result from the same agent is rejected."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[ResultRow]] = {}   # (job, params) -> results so far
        self.judged: list[tuple[str, str]] = []

    def judge(self, job: JobRow, task: TaskRow, result: ResultRow) -> Verdict:
        replicas = self.seen.setdefault((job.id, repr(sorted(task.params.items()))), [])
        if result not in replicas:
            if any(r.agent_id == result.agent_id for r in replicas):
                self.judged.append((task.id, "reject"))
                return Verdict.reject("a replica must run on another agent")
            replicas.append(result)
        verdict = ACCEPT if len({r.agent_id for r in replicas}) >= 2 else PENDING
        self.judged.append((task.id, verdict.decision.value))
        return verdict


# the doubles implement the protocols (checked by mypy where tests are typed; spelled out here)
_policy: DispatchPolicy = LastFirst()
_gate: LeaseGate = Refuse("x")
_observer: BoardObserver = Recorder()
_validator: ResultValidator = TwoAgentsAgree()


# -- a real board -----------------------------------------------------------------------------------
class Fixture:
    def __init__(self, board: Board, clock: Clock) -> None:
        self.board, self.clock = board, clock
        self.user = Identity.generate()
        self.agents = {name: Identity.generate() for name in ("a", "b")}

    async def submit(self, n: int, **policy: Any) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "p"},
                                "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n},
                                         "policy": {"retries": 2, **policy}}})
        job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
        return job.id

    async def lease(self, name: str, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(self.agents[name].id, slots, 0)

    async def report(self, name: str, task: Assignment, status: str = "ok") -> dict[str, Any]:
        agent = self.agents[name]
        payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                   "attempt": task.attempt, "agent_id": agent.id, "status": status}
        if status != "ok":
            payload.update(error_class="crashed", error="boom")
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        return outcome.encode()


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    boards: list[Board] = []

    async def build(**plugins: Any) -> Fixture:
        clock = Clock()
        config = HubConfig(lease_ttl_s=10, retry_backoff_s=0, expiry_interval_s=3600)
        board = Board(SqliteStore(tmp_path / f"b{len(boards)}.db"), config, clock, **plugins)
        await board.start()
        boards.append(board)
        f = Fixture(board, clock)
        for name, ident in f.agents.items():
            await board.register_agent(ident.public, name, Capabilities.from_dict({"kinds": ["sleep"]}))
        return f

    yield build
    for board in boards:
        await board.stop()


# -- each takes effect ------------------------------------------------------------------------------
async def test_a_policy_chooses_the_candidate_it_wants(make: Any) -> None:
    policy = LastFirst()
    f = await make(policy=policy)
    await f.submit(3)
    assert [t.idx for t in await f.lease("a")] == [2]
    assert [t.idx for t in await f.lease("b", slots=2)] == [1, 0]
    assert await f.lease("a") == []            # nothing left
    assert f.board.policy is policy


async def test_the_policy_hears_every_settled_attempt(make: Any) -> None:
    policy = LastFirst()
    f = await make(policy=policy)
    await f.submit(2)
    [task] = await f.lease("a")
    await f.report("a", task)
    assert policy.settled == [task.task_id]


async def test_a_gate_refuses_an_agent_until_it_is_removed(make: Any) -> None:
    f = await make()
    await f.submit(2)
    gate = Refuse(f.agents["a"].id)
    f.board.add_gate(gate)
    assert await f.lease("a") == []
    assert f.board.view.agents[f.agents["a"].id].refused == "on a break"
    assert len(await f.lease("b")) == 1        # the others still get work
    f.board.remove_gate(gate)
    assert len(await f.lease("a")) == 1
    assert f.board.view.agents[f.agents["a"].id].refused is None


async def test_an_observer_and_a_listener_see_what_happens(make: Any) -> None:
    f = await make()
    seen = Recorder()
    f.board.add_observer(seen)
    f.board.add_listener(seen.on_event)
    job_id = await f.submit(3)
    t0, t1, t2 = await f.lease("a", slots=3)
    await f.report("a", t0)
    await f.report("a", t1, "failed")
    f.clock.now += 11
    await f.board.sweep()                      # t2's lease expires
    a = f.agents["a"].id
    assert seen.attempts == [(a, t0.task_id, True, None), (a, t1.task_id, False, "crashed"),
                             (a, t2.task_id, False, "agent_lost")]
    for task in await f.lease("b", slots=2):
        await f.report("b", task)
    assert (await f.board.job_view(job_id))["state"] == "succeeded"
    assert seen.events == ["job_submitted", "lease_expired", "job_finished"]
    f.board.remove_observer(seen)
    f.board.remove_listener(seen.on_event)
    await f.submit(1)
    assert seen.events[-1] == "job_finished"   # no longer told


async def test_a_validator_holds_a_result_until_a_replica_agrees(make: Any) -> None:
    validator = TwoAgentsAgree()
    f = await make(validator=validator)
    job_id = await f.submit(1, replicas=2)
    [first] = await f.lease("a")
    assert (await f.report("a", first))["status"] == "pending"
    assert (await f.report("a", first))["status"] == "pending"       # a re-send is still pending
    view = await f.board.job_view(job_id)
    assert view["state"] == "running" and view["tasks"] == {"leased": 1, "queued": 1}
    assert not f.board.view.agents[f.agents["a"].id].running         # the agent is free again
    [second] = await f.lease("b")
    assert (await f.report("b", second))["status"] == "accepted"
    # The held result was judged again and accepted with it: both results are stored, the job is done.
    assert validator.judged[-2:] == [(second.task_id, "accept"), (first.task_id, "accept")]
    view = await f.board.job_view(job_id)
    assert view["state"] == "succeeded" and view["tasks"] == {"done": 2}
    stored = await f.board.view.results(job_id)
    assert {(r.task_id, r.agent_id) for r in stored} == {(first.task_id, f.agents["a"].id),
                                                         (second.task_id, f.agents["b"].id)}
    assert (await f.report("a", first))["status"] == "duplicate"     # settled now, from the store


class RejectFirst:
    """A validator that rejects the first result it sees and accepts the rest."""

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, job: JobRow, task: TaskRow, result: ResultRow) -> Verdict:
        self.calls += 1
        return Verdict.reject("the first answer is always wrong") if self.calls == 1 else ACCEPT


async def test_a_rejected_result_fails_the_attempt_and_the_task_runs_again(make: Any) -> None:
    f = await make(validator=RejectFirst())
    job_id = await f.submit(1)
    [first] = await f.lease("a")
    rejected = await f.report("a", first)
    assert rejected["status"] == "rejected" and rejected["error"] == "result_invalid"
    task = f.board.view.task(first.task_id)
    assert task is not None and task.state == TaskState.QUEUED and task.attempt == 2
    assert task.error is not None and "always wrong" in task.error
    [retry] = await f.lease("b")
    assert retry.task_id == first.task_id and retry.attempt == 2
    assert (await f.report("b", retry))["status"] == "accepted"
    assert (await f.board.job_view(job_id))["state"] == "succeeded"
