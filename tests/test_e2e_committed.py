"""Committed manifests end to end (jobs/committed.py): a real board over TLS in this process (so a test can make it
lie or restart it), `panal agent run` as a process.

A committed job runs on a real agent with no envelope fetched; a board that swaps a task's params, index or proof
gets the task refused as tampered; a submit whose lists are not the signed ones is a 400 of its own; a restarted
board proves units again from the stored lists; the submitter's results view reads its params from its own lists,
checked against its signed root.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import InProcessHub, Procs
from helpers import scaled, wait_for_async
from test_api import registered, sleep_manifest, submitter
from test_e2e_envelopes import agent_running, finished, lie, sleeps, start_board

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, verify_results
from agent.client.sweep import check_params, sweep_of
from agent.daemon.assignments import ManifestCache
from agent.tools.bench_shards import run_shard_bench
from jobs.committed import UnitProofs, open_lists
from jobs.manifest import Manifest
from jobs.protocol import Assignment, LeaseReply, LeaseRequest
from security.errors import PanalError
from security.identity import Identity
from security.records import SignedRecord

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


async def submit_committed(hub: InProcessHub, user: Identity, seconds: list[float]) -> tuple[str, UnitProofs]:
    """A committed job's id, and its proofs as the board builds them."""
    assert hub.address is not None
    envelope = make_envelope(user, sleeps("committed", seconds), commit_bytes=0)
    async with BoardClient(hub.address, user, retry_for_s=5) as client:
        job = await submit(client, envelope)
    return str(job["id"]), open_lists(SignedRecord.from_wire(envelope).verify(), envelope["units"], 100)[2]


async def test_a_committed_job_runs_on_a_real_agent_without_a_fetch_and_its_submitter_reads_its_params(
        tmp_path: Path, procs: Procs) -> None:
    hub, server, user = await start_board(tmp_path)
    board = server.board
    try:
        await agent_running(hub, board, tmp_path, procs, 2)
        seconds = [i / 1000 for i in range(6)]
        job, _ = await submit_committed(hub, user, seconds)
        assert await finished(board, job, procs) == "succeeded"
        stats = board.view.stats
        assert (stats["envelopes_sent"], stats["envelopes_to_fetch"], stats["envelopes_fetched"]) == (1, 0, 0)
        assert hub.address is not None
        async with BoardClient(hub.address, user, retry_for_s=5) as client:
            reply = await client.call("GET", f"/v1/jobs/{job}/results")
        assert all(check.ok for check in verify_results(reply))
        assert sweep_of(reply).points == [{"seconds": s} for s in seconds]
        # the results view carries the lists beside the signed head: a board that swaps them is caught
        swapped = {**reply, "envelope": {**reply["envelope"], "units": {"sweep": {"seconds": seconds[::-1]},
                                                                        "shards": {}}}}
        forged = sweep_of(swapped)
        assert forged.points is None and "not what its submitter signed" in forged.why_not
        assert not any(c.ok for c in check_params(verify_results(swapped), swapped, forged))
    finally:
        await hub.stop()


async def test_a_board_that_swaps_a_committed_tasks_params_index_or_proof_gets_it_refused_as_tampered(
        tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, server, user = await start_board(tmp_path)
    board = server.board
    proofs: list[UnitProofs] = []

    def swap(a: Assignment) -> Assignment:
        if a.idx == 0:      # another unit's params, with this unit's proof
            return dataclasses.replace(a, params={"seconds": 0.002})
        if a.idx == 1:      # this unit's params and proof, at another index
            return dataclasses.replace(a, idx=2)
        return dataclasses.replace(a, proof=proofs[0].proof(0))   # unit 0's proof for unit 2
    try:
        lie(board, monkeypatch, swap)
        await agent_running(hub, board, tmp_path, procs, 1)
        job, built = await submit_committed(hub, user, [0.0, 0.001, 0.002])
        proofs.append(built)
        for idx in range(3):
            said = f"task {job}.{idx} differs from what its submitter signed"
            await wait_for_async(lambda s=said: s in procs.logs_text(), f"the agent to refuse task {idx}",   # type: ignore[misc]
                                 timeout_s=scaled(60), diagnose=procs.logs_text)
        assert not any(r for r in await board.view.results(job) if SignedRecord.from_wire(r.record).verify()
                       .get("status") == "ok")
    finally:
        await hub.stop()


async def test_a_submit_whose_lists_are_not_the_signed_ones_is_a_400_of_its_own(hub: InProcessHub) -> None:
    async with await submitter(hub) as user:
        envelope = make_envelope(user.identity, sleep_manifest(20), commit_bytes=0)
        cases = {
            "units_root_mismatch": {"sweep": {"seconds": [1.0] * 20}, "shards": {}},
            "bad_field": "garbage",
        }
        for code, lists in cases.items():
            with pytest.raises(PanalError) as refused:
                await submit(user, {**envelope, "units": lists})
            assert refused.value.code == code and refused.value.status == 400
        with pytest.raises(PanalError) as missing:
            await submit(user, {k: v for k, v in envelope.items() if k != "units"})
        assert missing.value.status == 400
        assert (await submit(user, envelope))["n_tasks"] == 20   # the signed lists are taken
        # lists over the hub's max_tasks_per_job, as many as the head claims: refused before any tree
        head = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "huge"}, "spec": {"task": "sleep"}}
        huge = SignedRecord.sign(user.identity, {"manifest": head, "units": {
            "count": 20_000, "root": bytes(32), "sweep": ["seconds"]}}).to_wire()
        with pytest.raises(PanalError) as over:
            await submit(user, {**huge, "units": {"sweep": {"seconds": [0.0] * 20_000}, "shards": {}}})
        assert over.value.code == "invalid_manifest" and "more than the limit" in over.value.message
        # a head that claims 10^8 units, with lists of fewer: not the signed job, refused before they are expanded
        claims = SignedRecord.sign(user.identity, {"manifest": head, "units": {
            "count": 10**8, "root": bytes(32), "sweep": ["seconds"]}}).to_wire()
        with pytest.raises(PanalError) as fewer:
            await submit(user, {**claims, "units": {"sweep": {"seconds": [0.0] * 20_000}, "shards": {}}})
        assert fewer.value.code == "units_root_mismatch" and fewer.value.status == 400


async def test_a_restarted_board_proves_a_committed_jobs_units_from_its_stored_lists(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path)
    await hub.start()
    async with await submitter(hub) as user:
        envelope = make_envelope(user.identity, sleep_manifest(40), commit_bytes=0)
        job = (await submit(user, envelope))["id"]
    await hub.stop()
    hub = InProcessHub(tmp_path)
    await hub.start()
    try:
        agent, _ = await registered(hub)
        async with agent:
            reply = await agent.post("/v1/lease", LeaseRequest(8, 2.0, (), {}), LeaseReply.decode)
        assert len(reply.tasks) == 8 and all(t.job_id == job and t.proof is not None for t in reply.tasks)
        cache, record = ManifestCache(), SignedRecord.from_wire(envelope)
        assert reply.tasks[0].envelope == record     # the small head, inline once
        for task in reply.tasks:
            assert cache.check(dataclasses.replace(task, envelope=record))[0] == user.identity.id
    finally:
        await hub.stop()


@pytest.mark.timeout(scaled(400))
async def test_each_agent_of_a_committed_sharded_job_downloads_only_its_proven_shards(tmp_path: Path) -> None:
    """Two real agents, a job whose shard digests are not in its signed head but proven per task."""
    figures = await run_shard_bench(tmp_path, data_mb=1, shards=4, agents=2, timeout_s=scaled(300), commit_bytes=0)
    assert figures["state"] == "succeeded"
    ran = [a for a in figures["per_agent"].values() if a["tasks"]]
    assert sum(a["tasks"] for a in ran) == 4
    for agent in figures["per_agent"].values():
        assert agent["fetched"] == agent["needed"]            # its shards and the model, each once, nothing else


async def test_a_board_restarted_without_a_committed_jobs_kind_still_starts_and_leases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a board rebuilds each committed job's proofs at start, and a job whose lists no longer open
    there (its kind is not enabled any more: test kinds off) raised out of ``Board.start``: one stored job kept the
    whole hub from starting. A job signed whole of that kind never did."""
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")
    hub = InProcessHub(tmp_path)
    await hub.start()
    chaos = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "chaos"},
                                "spec": {"task": "chaos", "sweep": {"seconds": [0.0, 0.1, 0.2]}}})
    async with await submitter(hub) as user:
        job = (await submit(user, make_envelope(user.identity, chaos, commit_bytes=0)))["id"]
    await hub.stop()
    monkeypatch.delenv("PANAL_TEST_KINDS")
    hub = InProcessHub(tmp_path)
    server = await hub.start()
    try:
        assert (await server.board.job_view(job))["state"] == "queued"
        async with await submitter(hub) as user:
            other = (await submit(user, make_envelope(user.identity, sleep_manifest(2), commit_bytes=0)))["id"]
        agent, _ = await registered(hub)
        async with agent:
            reply = await agent.post("/v1/lease", LeaseRequest(2, 2.0, (), {}), LeaseReply.decode)
        assert {t.job_id for t in reply.tasks} == {other} and all(t.proof is not None for t in reply.tasks)
    finally:
        await hub.stop()


async def only_a_newer_agent_gets(hub: InProcessHub, committed: str, n: int) -> tuple[Assignment, ...]:
    """An agent without ``unit-proofs`` is leased none of the committed job's tasks (what it is leased is returned)
    and the job's waiting line names the missing feature; then an agent with it is leased all ``n``."""
    older, _ = await registered(hub, features=[])
    async with older:
        got = (await older.post("/v1/lease", LeaseRequest(8, 0.5, (), {}), LeaseReply.decode)).tasks
        view = await older.call("GET", f"/v1/jobs/{committed}/public")
    assert all(t.job_id != committed for t in got)
    why = view["waiting_because"]
    assert any("unit-proofs" in line and " 0 of " in line for line in why), why
    newer, _ = await registered(hub)
    async with newer:
        reply = await newer.post("/v1/lease", LeaseRequest(8, 2.0, (), {}), LeaseReply.decode)
    assert {t.job_id for t in reply.tasks} == {committed} and len(reply.tasks) == n
    return got


async def test_an_older_agent_is_not_sent_a_committed_jobs_tasks_and_the_job_says_why(tmp_path: Path) -> None:
    """An agent that does not report ``unit-proofs`` predates committed manifests: it would refuse each task as
    tampered (an attempt spent, the task sent on). The board sends it a job signed whole, never a committed one, and
    the committed job's waiting line names what is missing."""
    hub = InProcessHub(tmp_path)
    await hub.start()
    try:
        async with await submitter(hub) as user:
            committed = (await submit(user, make_envelope(user.identity, sleep_manifest(3), commit_bytes=0)))["id"]
            whole = (await submit(user, make_envelope(user.identity, sleep_manifest(2))))["id"]
        older_got = await only_a_newer_agent_gets(hub, committed, 3)
        assert [t.job_id for t in older_got] == [whole, whole]
    finally:
        await hub.stop()
