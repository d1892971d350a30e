"""The store contract, continued: the records a board keeps beside its jobs and tasks, run against each store
the factory can build (the backends and helpers of tests/test_store_contract.py): which submitter's jobs and
blobs are whose (privacy, upload quotas, reading rights), admission tokens, trust records, a job's best task,
the status page's history, and a committed job's lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest
import test_store_contract
from test_store_contract import SIGNER, Backend, done, job, opened, result, sha, tasks

from hub.records import HistoryBucket, JobState, TaskRow, TaskState
from hub.store import Store
from hub.tokens import new_token

backend, make = test_store_contract.backend, test_store_contract.make   # the fixtures: every backend


# -- privacy and blob ownership (#16 parts 5-6) ----------------------------------------------------------


async def test_list_submitter_jobs_is_one_submitters_newest_first(make: Callable[[], Store]) -> None:
    rows = [job(f"j{i}", created_at=float(i)) for i in range(3)]
    rows.append(replace(job("other", created_at=10.0), submitter_id="someone-else"))
    async with opened(make) as store:
        for row in rows:
            await store.create_job(row, tasks(row))
        assert [j.id for j in await store.list_submitter_jobs(SIGNER.id)] == ["j2", "j1", "j0"]
        assert [j.id for j in await store.list_submitter_jobs(SIGNER.id, JobState.QUEUED, 1)] == ["j2"]
        assert [j.id for j in await store.list_submitter_jobs("someone-else")] == ["other"]
        assert await store.list_submitter_jobs(SIGNER.id, JobState.FAILED) == []


async def test_blob_uploads_count_until_claimed_and_go_when_collected(make: Callable[[], Store]) -> None:
    async with opened(make) as store:
        assert await store.blob_usage("k1") == (0, 0)
        await store.record_blob_upload(sha("a"), "k1", 100, 1.0)
        await store.record_blob_upload(sha("b"), "k1", 50, 2.0)
        await store.record_blob_upload(sha("a"), "k2", 100, 3.0)
        await store.record_blob_upload(sha("b"), "k1", 50, 4.0)      # again: still one row
        assert await store.blob_usage("k1") == (150, 2) and await store.blob_usage("k2") == (100, 1)
        assert await store.blob_uploaded_by(sha("a"), "k2") and not await store.blob_uploaded_by(sha("b"), "k2")
        await store.settle_blob_uploads({sha("a")}, {sha("b")})       # a: claimed by a job; b: collected
        assert await store.blob_usage("k1") == (0, 0) and await store.blob_usage("k2") == (0, 0)
        assert await store.blob_uploaded_by(sha("a"), "k1") and not await store.blob_uploaded_by(sha("b"), "k1")
    async with opened(make) as store:                                  # durable
        assert await store.blob_uploaded_by(sha("a"), "k2")


async def test_a_submitter_references_its_jobs_inputs_outputs_and_checkpoints(make: Callable[[], Store]) -> None:
    row = job("j1", inputs={"weights": {"blob": sha("in")}})
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        await store.accept_results([result(t0, {"y": {"sha256": sha("out")}})], [done(t0)], [])
        await store.save_tasks([replace(t1, checkpoint=sha("ckpt"))])
        for name in ("in", "out", "ckpt"):
            assert await store.submitter_references_blob(sha(name), SIGNER.id), name
            assert not await store.submitter_references_blob(sha(name), "someone-else"), name
        assert not await store.submitter_references_blob(sha("unrelated"), SIGNER.id)
        # an output someone else uploaded, named by the result's agent, opens nothing
        await store.record_blob_upload(sha("out"), "another-agent", 10, 1.0)
        assert not await store.submitter_references_blob(sha("out"), SIGNER.id)
        await store.record_blob_upload(sha("out"), "agent-1", 10, 2.0)     # the result's own agent did too
        assert await store.submitter_references_blob(sha("out"), SIGNER.id)


# -- admission tokens (hub/tokens.py) ---------------------------------------------------------------


async def test_admission_tokens_survive_a_restart_are_used_up_and_revoked(make: Callable[[], Store],
                                                                         backend: Backend) -> None:
    single, _ = new_token("one", 1, 1000.0, 60.0)
    multi, _ = new_token("many", 3, 1001.0, 60.0)
    async with opened(make) as store:
        await store.add_admission_token(single)
        await store.add_admission_token(multi)
        with pytest.raises(backend.conflict):
            await store.add_admission_token(single)
    async with opened(make) as store:  # a restart keeps them (hashed: no secret is stored)
        assert [t.id for t in await store.list_admission_tokens()] == [single.id, multi.id]
        assert await store.use_admission_token(single.id, "wrong-hash", 1010.0) is False
        assert await store.use_admission_token(single.id, single.secret_hash, 1010.0) is True
        assert await store.use_admission_token(single.id, single.secret_hash, 1010.0) is False  # used up
        assert await store.use_admission_token(multi.id, multi.secret_hash, 1061.0) is False   # expired
        assert await store.revoke_admission_token(multi.id, 1020.0) is True
        assert await store.revoke_admission_token(multi.id, 1021.0) is False
        assert await store.revoke_admission_token("00000000", 1021.0) is False
        assert await store.use_admission_token(multi.id, multi.secret_hash, 1030.0) is False   # revoked
        rows = {t.id: t for t in await store.list_admission_tokens()}
        assert rows[single.id].uses == 1 and rows[single.id].refusal(1010.0) == "used_up"
        assert rows[multi.id].revoked_at == 1020.0 and rows[multi.id].refusal(1030.0) == "revoked"


async def test_the_last_use_of_a_single_use_token_is_counted_once_under_concurrency(
        make: Callable[[], Store]) -> None:
    token, _ = new_token("one", 1, 1000.0, 60.0)
    async with opened(make) as store:
        await store.add_admission_token(token)
        outcomes = await asyncio.gather(*(store.use_admission_token(token.id, token.secret_hash, 1001.0)
                                          for _ in range(20)))
        assert outcomes.count(True) == 1


# -- result validation (hub/trust/) ------------------------------------------------------------
async def test_instances_are_added_to_a_job_with_their_unit_and_read_back(make: Callable[[], Store]) -> None:
    row = replace(job("j1"), validation={"quorum": 2})
    async with opened(make) as store:
        await store.create_job(row, tasks(row))
        row.n_tasks = 3
        extra = TaskRow(id="j1.2", job_id="j1", idx=2, params={"seconds": 0.0}, updated_at=1.0, unit=0)
        await store.add_tasks([extra], [row])
    async with opened(make) as store:
        stored = await store.get_job("j1")
        assert stored is not None and stored.n_tasks == 3 and stored.validation == {"quorum": 2}
        assert [(t.id, t.unit, t.unit_idx) for t in await store.get_tasks("j1")] == [
            ("j1.0", None, 0), ("j1.1", None, 1), ("j1.2", 0, 0)]


async def test_trust_records_upsert_credit_adds_up_and_all_survive_a_restart(make: Callable[[], Store]) -> None:
    from hub.trust.records import Ban, CreditGrant, ReputationRow, TrustWrite, ValidationRow

    async with opened(make) as store:
        await store.record_trust(TrustWrite(
            validations=[ValidationRow("j1", 0, "validated", 2, "j1.0", ["a", "b"], {"values": {"x": 1}}, 5.0)],
            reputation=[ReputationRow("a", "sleep", 3, 3, 0, 5.0)],
            credit=[CreditGrant("agent:a", 1.5), CreditGrant("owner:alice", 1.5)],
            bans=[Ban("z", "quarantined: lies", 1.0, 99.0)]))
        await store.record_trust(TrustWrite(reputation=[ReputationRow("a", "sleep", 0, 3, 1, 6.0)],
                                            credit=[CreditGrant("agent:a", 2.0)]))
    async with opened(make) as store:
        snap = await store.load_trust()
        assert snap.reputation == [ReputationRow("a", "sleep", 0, 3, 1, 6.0)]
        assert snap.credit == {"agent:a": (3.5, 2), "owner:alice": (1.5, 1)}
        assert snap.bans == [Ban("z", "quarantined: lies", 1.0, 99.0)]
        [v] = await store.get_validations("j1")
        assert (v.state, v.agents, v.canonical_task) == ("validated", ["a", "b"], "j1.0")
        assert v.detail == {"values": {"x": 1}}
        assert await store.get_validations("j2") == []


# -- reading sweeps (hub/best.py) --------------------------------------------------------------
async def test_a_jobs_report_and_best_task_are_written_with_its_results_and_read_back(
        make: Callable[[], Store]) -> None:
    row = replace(job("j1"), report={"metric": "val_acc", "mode": "max"})
    t0, t1 = tasks(row)
    async with opened(make) as store:
        await store.create_job(row, [t0, t1])
        row.best = {"task_id": "j1.0", "unit": 0, "metric": "val_acc", "mode": "max", "value": 0.5, "params": {}}
        await store.accept_results([result(t0)], [replace(t0, state=TaskState.DONE)], [row])
    async with opened(make) as store:
        [active], _ = await store.load_active()
        assert active.report == {"metric": "val_acc", "mode": "max"} and active.best == row.best
        row.best = {**row.best, "task_id": "j1.1", "unit": 1, "value": 0.75}
        row.state = JobState.SUCCEEDED
        await store.save_tasks([replace(t1, state=TaskState.DONE)], [row])
    async with opened(make) as store:
        stored = await store.get_job("j1")
        assert stored is not None and stored.best == row.best and stored.state == JobState.SUCCEEDED


async def test_status_history_buckets_are_replaced_by_start_dropped_past_keep_since_and_survive_a_restart(
        make: Callable[[], Store]) -> None:
    async with opened(make) as store:
        assert await store.load_status_history(0) == []
        await store.save_status_history([HistoryBucket(600.0, 1, 0, 2, 3), HistoryBucket(1200.0, 4, 1, 5, 6)], 0)
        await store.save_status_history([HistoryBucket(1200.0, 9, 2, 7, 0)], 0)       # the same bucket, later
    async with opened(make) as store:
        assert await store.load_status_history(0) == [HistoryBucket(600.0, 1, 0, 2, 3),
                                                       HistoryBucket(1200.0, 9, 2, 7, 0)]
        assert await store.load_status_history(1200.0) == [HistoryBucket(1200.0, 9, 2, 7, 0)]
        await store.save_status_history([HistoryBucket(1800.0, 1, 1, 1, 1)], keep_since=1200.0)
        assert [b.start for b in await store.load_status_history(0)] == [1200.0, 1800.0]


async def test_a_committed_jobs_lists_are_stored_with_its_envelope_and_its_shards_stay_referenced(
        make: Callable[[], Store]) -> None:
    """A committed job (jobs/committed.py) stores the lists sent beside its signature: a restarted board proves its
    units from them, and blob GC and reading rights see every shard blob they name."""
    shards = [{"blob": sha(f"shard{i}"), "size": 10, "rows": 2} for i in range(3)]
    row = job("jc", inputs={"data": {"name": "d", "rows": 6, "shard": {"by": "rows", "count": 3}}})
    row.envelope = {**row.envelope, "units": {"sweep": {"seconds": [0.0, 1.0]}, "shards": {"data": shards}}}
    async with opened(make) as store:
        await store.create_job(row, tasks(row))
    async with opened(make) as store:
        stored = await store.get_job("jc")
        assert stored is not None and stored.envelope == row.envelope
        assert await store.referenced_blobs() == {s["blob"] for s in shards}
        assert await store.submitter_references_blob(shards[1]["blob"], SIGNER.id)
