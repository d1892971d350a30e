"""A job's best task by its manifest's ``spec.report`` (hub/best.py): kept by a real board over TLS as signed
results are accepted, only accepted (validated) results counting, stored with the job row so that it
survives a restart; and ``spec.report`` validation with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, verify_results
from agent.client.sweep import check_params, sweep_of, sweep_rows
from jobs.manifest import Manifest, ManifestError
from security.errors import BadRequest
from security.identity import Identity
from security.records import SignedRecord

CAPS = {"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 4, "model": "Test CPU", "gflops_fp32": 200.0}}


def sweep(n: int, report: dict[str, Any] | None, **policy: Any) -> Manifest:
    spec: dict[str, Any] = {"task": "sleep", "sweep": {"seconds": [0.001 * (i + 1) for i in range(n)]}}
    if report is not None:
        spec["report"] = report
    if policy:
        spec["policy"] = policy
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "lr-sweep"},
                               "spec": spec})


async def agent(hub: InProcessHub, name: str) -> BoardClient:
    assert hub.address is not None
    ident = Identity.generate()
    client = BoardClient(hub.address, ident, retry_for_s=1)
    await client.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": name, "capabilities": CAPS})
    return client


async def submitter(hub: InProcessHub, user: Identity) -> BoardClient:
    assert hub.address is not None and hub.server is not None
    await hub.server.add_submitter(user.public, "user")
    return BoardClient(hub.address, user, retry_for_s=1)


async def lease(client: BoardClient) -> dict[str, Any]:
    [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
    return dict(task)


async def answer(client: BoardClient, task: dict[str, Any], values: dict[str, Any], status: str = "ok") -> str:
    """Deliver a result signed by the agent, as an agent does (params and unit included)."""
    payload = {"task_id": task["task_id"], "job_id": task["job_id"], "lease_id": task["lease_id"],
               "attempt": task["attempt"], "agent_id": client.identity.id, "status": status,
               "metrics": {"wall_s": 1.0}, "unit": task["idx"], "params": task["params"]}
    payload.update({"values": values} if status == "ok" else {"error_class": "crashed", "error": "boom"})
    record = SignedRecord.sign(client.identity, payload).to_wire()
    reply = await client.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    return str(reply["results"][0]["status"]) if "results" in reply else str(reply.get("status"))


async def best_of(client: BoardClient, job_id: str) -> dict[str, Any] | None:
    job = (await client.call("GET", f"/v1/jobs/{job_id}"))["job"]
    best: dict[str, Any] | None = job["best"]
    return best


async def test_best_task_follows_accepted_results_and_survives_a_restart(tmp_path: Path, user: Identity) -> None:
    hub = InProcessHub(tmp_path)
    await hub.start()
    worker, sub = await agent(hub, "w1"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(5, {"metric": "val_acc", "mode": "max"})))
    assert job["report"] == {"metric": "val_acc", "mode": "max"} and job["best"] is None
    answers = [{"val_acc": 0.5}, {"val_acc": 0.9}, {"val_acc": 0.7},   # 0.9 stays best over a later 0.7
               {"val_acc": "high", "note": "not a number: not ranked"}]
    for values in answers:
        await answer(worker, await lease(worker), values)
    best = await best_of(sub, job["id"])
    assert best is not None
    assert (best["unit"], best["value"], best["metric"], best["mode"]) == (1, 0.9, "val_acc", "max")
    assert best["task_id"] == f"{job['id']}.1" and best["params"]["seconds"] == 0.002
    assert best["agent"] == worker.identity.id
    await worker.close()
    await sub.close()

    await hub.stop()   # the job is still running (one task queued): its best is in the stored job row
    await hub.start()
    assert hub.address is not None
    worker, sub = await agent(hub, "w1-again"), BoardClient(hub.address, user, retry_for_s=1)
    assert (await best_of(sub, job["id"])) == best
    await answer(worker, await lease(worker), {"val_acc": 0.95})   # the board restarted: the new best still counts
    final = (await sub.call("GET", f"/v1/jobs/{job['id']}"))["job"]
    assert final["state"] == "succeeded" and (final["best"]["unit"], final["best"]["value"]) == (4, 0.95)
    await worker.close()
    await sub.close()
    await hub.stop()

    await hub.start()   # a finished job's best comes from its row, not from a scan of its results
    assert hub.address is not None
    async with BoardClient(hub.address, user, retry_for_s=1) as sub:
        assert (await best_of(sub, job["id"])) == final["best"]
    await hub.stop()


async def test_min_mode_ranks_by_a_run_metric_when_no_value_has_the_name(hub: InProcessHub, user: Identity) -> None:
    worker, sub = await agent(hub, "w1"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(2, {"metric": "wall_s", "mode": "min"})))
    for _ in range(2):
        await answer(worker, await lease(worker), {})
    best = await best_of(sub, job["id"])
    assert best is not None and best["unit"] == 0 and best["value"] == 1.0   # a tie keeps the first
    await worker.close()
    await sub.close()


async def test_only_validated_results_count_and_failures_never_do(hub: InProcessHub, user: Identity) -> None:
    """With a quorum of 2, a result held for its unit's other instance is not the best yet; an agent whose
    answer failed gives no best either."""
    a, b, sub = await agent(hub, "a"), await agent(hub, "b"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(1, {"metric": "val_acc", "mode": "max"}, replicas=2)))
    first = await lease(a)
    assert await answer(a, first, {"val_acc": 0.99}) == "pending"
    assert await best_of(sub, job["id"]) is None          # held for validation: not counted
    second = await lease(b)
    assert second["idx"] == first["idx"] == 0              # the same unit, the other instance
    await answer(b, second, {"val_acc": 0.99})
    best = await best_of(sub, job["id"])
    assert best is not None and best["unit"] == 0 and best["value"] == 0.99

    other = await submit(sub, make_envelope(user, sweep(1, {"metric": "val_acc", "mode": "max"}, retries=0)))
    await answer(a, await lease(a), {}, status="failed")
    view = (await sub.call("GET", f"/v1/jobs/{other['id']}"))["job"]
    assert view["state"] == "failed" and view["best"] is None
    for c in (a, b, sub):
        await c.close()


async def test_a_job_without_report_has_no_best(hub: InProcessHub, user: Identity) -> None:
    worker, sub = await agent(hub, "w1"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(1, None)))
    await answer(worker, await lease(worker), {"val_acc": 1.0})
    view = (await sub.call("GET", f"/v1/jobs/{job['id']}"))["job"]
    assert view["state"] == "succeeded" and view["best"] is None and view["report"] is None
    await worker.close()
    await sub.close()


@pytest.mark.parametrize(("report", "message"), [
    ({"metric": "val_acc"}, "spec.report: missing required field mode"),
    ({"metric": "val_acc", "mode": "best"}, "spec.report.mode: expected one of max, min, got \"best\""),
    ({"metric": "val acc; drop", "mode": "max"}, "spec.report.metric: unexpected format"),
    ({"metric": "val_acc", "mode": "max", "higher": True}, "spec.report.higher: unknown field 'higher'"),
    ("val_acc", "spec.report: expected a map, got \"val_acc\""),
])
def test_bad_report_specs_are_refused_with_the_field(report: Any, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "x"},
                            "spec": {"task": "sleep", "report": report}})
    assert message in err.value.message


async def test_the_board_refuses_a_result_signed_with_other_params_than_its_task(hub: InProcessHub,
                                                                                user: Identity) -> None:
    """An agent that claims its value came from other params (or another unit) is refused: it never
    becomes the best, and the task runs again."""
    liar, sub = await agent(hub, "liar"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(2, {"metric": "val_acc", "mode": "max"})))
    for change in ({"params": {"seconds": 9.0}}, {"idx": 7}):
        task = await lease(liar)
        with pytest.raises(BadRequest) as err:
            await answer(liar, {**task, **change}, {"val_acc": 0.99})
        assert err.value.code == "wrong_params" and "names other params or another unit" in err.value.message
        await liar.call("POST", f"/v1/tasks/{task['task_id']}/release", {"lease_id": task["lease_id"]})
    assert await best_of(sub, job["id"]) is None
    for c in (liar, sub):
        await c.close()


async def test_results_take_params_from_the_signed_manifest_and_catch_a_board_misplacing_them(
        hub: InProcessHub, user: Identity) -> None:
    """`panal results` rows: params from the submitter's own manifest; `--verify` flags a result the board
    files under another unit than its agent signed; a failed task shows its error class."""
    worker, sub = await agent(hub, "honest"), await submitter(hub, user)
    job = await submit(sub, make_envelope(user, sweep(3, {"metric": "val_acc", "mode": "max"}, retries=0)))
    await answer(worker, await lease(worker), {"val_acc": 0.5})
    await answer(worker, await lease(worker), {"val_acc": 0.99})
    await answer(worker, await lease(worker), {}, status="failed")
    reply = dict(await sub.call("GET", f"/v1/jobs/{job['id']}/results"))
    tasks = (await sub.call("GET", f"/v1/jobs/{job['id']}/tasks"))["tasks"]
    view = sweep_of(reply)
    checks = check_params(verify_results(reply), reply, view)
    assert all(c.ok for c in checks)
    rows = sweep_rows(reply, checks, tasks, view)
    assert [(r["unit"], r["state"], r["params"], r["verified"]) for r in rows] == [
        (0, "done", {"seconds": 0.001}, True), (1, "done", {"seconds": 0.002}, True),
        (2, "failed", {"seconds": 0.003}, None)]
    assert rows[1]["values"] == {"val_acc": 0.99}
    assert rows[2]["error_class"] == "crashed" and rows[2]["values"] == {} and rows[2]["error"] == "boom"

    lying = {**reply, "results": [{**r, "unit": 2 if r["unit"] == 1 else r["unit"]} for r in reply["results"]]}
    [_, moved] = check_params(verify_results(lying), lying, view)   # a board filing unit 1's value under unit 2
    assert not moved.ok and "the agent signed unit 1, the board says unit 2" in moved.problem
    for c in (worker, sub):
        await c.close()
