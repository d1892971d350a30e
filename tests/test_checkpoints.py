"""Checkpoints with provenance (issue #15 part 8) on a real Board over SQLite and with real signatures:
the board takes a checkpoint only with the current lessee's signed record of it, keeps the record
across restarts and hands it to the resuming agent, which verifies it; a result names the checkpoint
it resumed from and ``verify_results`` checks that chain offline."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import job_id_of, make_envelope, verify_results
from agent.daemon.execution import Executor
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.checkpoints import resumed_from, sign_checkpoint
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.protocol_upkeep import HeartbeatLease
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

CKPT = hashlib.sha256(b"checkpoint").hexdigest()
OTHER = hashlib.sha256(b"someone else's model").hexdigest()


def manifest() -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "ckpt"},
                               "spec": {"task": "sleep", "params": {"seconds": 0.0}, "policy": {"retries": 3}}})


class Fx:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.clock = tmp, FakeClock(1_000_000.0)
        self.config = HubConfig(retry_backoff_s=0, expiry_interval_s=3600)
        self.board = Board(SqliteStore(tmp / "b.db"), self.config, self.clock)
        self.user, self.lessee, self.next = Identity.generate(), Identity.generate(), Identity.generate()

    async def restart(self) -> None:
        await self.board.stop()
        self.board = Board(SqliteStore(self.tmp / "b.db"), self.config, self.clock)
        await self.board.start()

    async def beat(self, agent: Identity, task: Assignment, sha: str, record: SignedRecord | None) -> None:
        reply = await self.board.heartbeat(agent.id, [HeartbeatLease(task.task_id, task.lease_id, 0.5, sha, record)])
        assert reply.lost == ()

    def checkpoint_of(self, task_id: str) -> str | None:
        row = self.board.view.task(task_id)
        assert row is not None
        return row.checkpoint


@pytest.fixture
async def fx(tmp_path: Path) -> AsyncIterator[Fx]:
    f = Fx(tmp_path)
    await f.board.start()
    for agent in (f.lessee, f.next):
        await f.board.register_agent(agent.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    yield f
    await f.board.stop()


async def test_a_checkpoint_counts_only_with_the_lessees_record_for_its_task_and_attempt(fx: Fx) -> None:
    job, _ = await fx.board.submit(make_envelope(fx.user, manifest()), fx.user.id)
    [task] = await fx.board.lease(fx.lessee.id, 1, 0)
    # Pointing the task at any blob, unsigned (what any lessee could do before): ignored.
    await fx.beat(fx.lessee, task, OTHER, None)
    assert fx.checkpoint_of(task.task_id) is None
    # Signed by someone else, for another task, another attempt, or another blob: ignored.
    forged = [sign_checkpoint(fx.next, task.task_id, job.id, task.attempt, OTHER),
              sign_checkpoint(fx.lessee, job.id + ".7", job.id, task.attempt, OTHER),
              sign_checkpoint(fx.lessee, task.task_id, job.id, task.attempt + 1, OTHER),
              sign_checkpoint(fx.lessee, task.task_id, job.id, task.attempt, CKPT)]
    for record in forged:
        await fx.beat(fx.lessee, task, OTHER, record)
        assert fx.checkpoint_of(task.task_id) is None
    # The lessee's own record of the blob it names: kept, with the record, across a restart.
    await fx.beat(fx.lessee, task, CKPT, sign_checkpoint(fx.lessee, task.task_id, job.id, task.attempt, CKPT))
    assert fx.checkpoint_of(task.task_id) == CKPT
    await fx.board.release(fx.lessee.id, task.task_id, task.lease_id)
    await fx.restart()
    [resumed] = await fx.board.lease(fx.next.id, 1, 0)
    assert resumed.checkpoint == CKPT and resumed.checkpoint_record is not None
    assert resumed.checkpoint_record.key.id == fx.lessee.id


def _failed(agent: Identity, task: Assignment) -> SignedRecord:
    return SignedRecord.sign(agent, {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                                     "attempt": task.attempt, "agent_id": agent.id, "status": "failed",
                                     "error_class": "unsupported", "error": "not an mlp_train checkpoint"})


async def test_a_checkpoint_is_dropped_only_when_two_agents_fail_from_it_never_the_job(fx: Fx) -> None:
    job, _ = await fx.board.submit(make_envelope(fx.user, manifest()), fx.user.id)
    [task] = await fx.board.lease(fx.lessee.id, 1, 0)
    await fx.beat(fx.lessee, task, CKPT, sign_checkpoint(fx.lessee, task.task_id, job.id, task.attempt, CKPT))
    await fx.board.release(fx.lessee.id, task.task_id, task.lease_id)
    [resumed] = await fx.board.lease(fx.next.id, 1, 0)
    await fx.board.accept(fx.next.id, [_failed(fx.next, resumed)])
    # One agent's word (a liar's, perhaps) does not wipe the progress: kept, and that agent is held back.
    assert fx.checkpoint_of(task.task_id) == CKPT
    assert await fx.board.lease(fx.next.id, 1, 0) == []
    third = Identity.generate()
    await fx.board.register_agent(third.public, "c", Capabilities.from_dict({"kinds": ["sleep"]}))
    [again] = await fx.board.lease(third.id, 1, 0)
    assert again.checkpoint == CKPT
    await fx.board.accept(third.id, [_failed(third, again)])
    assert fx.checkpoint_of(task.task_id) is None        # two agents failed from it: it goes, not the job
    [fresh] = await fx.board.lease(fx.next.id, 1, 0)     # a fresh start, open to everyone again
    assert fresh.checkpoint is None and fresh.checkpoint_record is None
    assert (await fx.board.job_view(job.id))["state"] == "running"


def _assignment(task_id: str, attempt: int, sha: str | None, record: SignedRecord | None) -> Assignment:
    user = Identity.generate()
    return Assignment(task_id, task_id.partition(".")[0], 0, "L", attempt, "sleep", {}, 60.0, 30.0,
                      SignedRecord.sign(user, {"manifest": {}}), sha, record)


@pytest.mark.parametrize("case", ["unsigned", "other_task", "later_attempt", "other_blob"])
def test_a_resuming_agent_refuses_a_checkpoint_it_cannot_verify(case: str) -> None:
    writer = Identity.generate()
    record = {"unsigned": None,
              "other_task": sign_checkpoint(writer, "j1.1", "j1", 1, CKPT),
              "later_attempt": sign_checkpoint(writer, "j1.0", "j1", 3, CKPT),
              "other_blob": sign_checkpoint(writer, "j1.0", "j1", 1, OTHER)}[case]
    assert Executor.resume_point(_assignment("j1.0", 2, CKPT, record)) is None
    good = sign_checkpoint(writer, "j1.0", "j1", 1, CKPT)
    assert Executor.resume_point(_assignment("j1.0", 2, CKPT, good)) == good


def test_a_checkpoint_of_a_lease_given_back_is_resumed_under_the_same_attempt() -> None:
    """A lease given back (a long pause) requeues the task without using an attempt: the next lessee
    holds the attempt its predecessor wrote the checkpoint under, and must resume from it."""
    writer = Identity.generate()
    same = sign_checkpoint(writer, "j1.0", "j1", 2, CKPT)
    assert Executor.resume_point(_assignment("j1.0", 2, CKPT, same)) == same


def test_verify_names_the_checkpoint_a_result_resumed_from_and_refuses_a_forged_one() -> None:
    user, writer, agent = Identity.generate(), Identity.generate(), Identity.generate()
    envelope = make_envelope(user, manifest())
    job_id = job_id_of(envelope)
    good = sign_checkpoint(writer, f"{job_id}.0", job_id, 1, CKPT)

    def signed(resumed: Any) -> dict[str, Any]:
        record = SignedRecord.sign(agent, {"task_id": f"{job_id}.0", "job_id": job_id, "attempt": 2,
                                           "agent_id": agent.id, "status": "ok", "resumed_from": resumed})
        return {"envelope": envelope, "job": {"id": job_id},
                "results": [{"task_id": f"{job_id}.0", "agent": agent.id, "record": record.to_wire(),
                             "digest": hashlib.sha256(record.payload).hexdigest()}]}

    [check] = verify_results(signed({"record": good.to_wire()}))
    assert check.ok and resumed_from(check.payload) == writer.id
    tampered = dict(good.to_wire(), payload=sign_checkpoint(writer, f"{job_id}.0", job_id, 1, OTHER).payload)
    for bad in ({"record": tampered},                                                    # a forged signature
                {"record": sign_checkpoint(writer, f"{job_id}.1", job_id, 1, CKPT).to_wire()},   # another task
                {"record": sign_checkpoint(writer, f"{job_id}.0", job_id, 3, CKPT).to_wire()},   # a later one
                {"record": "nonsense"}):
        [check] = verify_results(signed(bad))
        assert not check.ok and "checkpoint it resumed from" in check.problem
