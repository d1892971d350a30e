"""Checkpoint poisoning, end to end (issue #15 part 8): a lessee points its tasks' checkpoints at a garbage
blob it uploaded and hands the leases back; an honest `panal agent run` (a real process over TLS) then
runs them. The unsigned checkpoint is never recorded; the signed garbage one fails the resumed attempt,
which drops the checkpoint instead of failing the job; the job succeeds and every result verifies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import scaled, wait_for
from test_e2e import job_view, start_agent

from agent.client.blobupload import upload_file
from agent.client.board import BoardClient
from jobs.checkpoints import sign_checkpoint
from security.httpsig import sign_request_digest
from security.identity import Identity
from security.tls import BoardAddress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


async def poison(url: str, garbage: Path) -> list[str]:
    """Lease every task as a fresh agent, point each at the garbage blob (task 0 unsigned, the others
    signed by this lessee), and give the leases back. Returns the task ids."""
    attacker = Identity.generate()
    async with BoardClient(BoardAddress.parse(url), attacker, retry_for_s=5) as client:
        await client.call("POST", "/v1/agents", {"public_key": attacker.public.text(), "name": "mallory",
                                                 "capabilities": {"kinds": ["mlp_train"], "slots": 4}})
        tasks = (await client.call("POST", "/v1/lease", {"slots": 4, "wait_s": 10}))["tasks"]
        sha = await upload_file(client.session(), client.address.url, garbage,
                                lambda m, p, q, d: sign_request_digest(attacker, m, p, q, d))
        leases = []
        for task in tasks:
            lease = {"task_id": task["task_id"], "lease_id": task["lease_id"], "progress": 0.9, "checkpoint": sha}
            if task["idx"] > 0:
                lease["checkpoint_record"] = sign_checkpoint(attacker, task["task_id"], task["job_id"],
                                                             task["attempt"], sha).to_wire()
            leases.append(lease)
        await client.call("POST", "/v1/heartbeat", {"leases": leases})
        for task in tasks:
            await client.call("POST", f"/v1/tasks/{task['task_id']}/release", {"lease_id": task["lease_id"]})
        return [task["task_id"] for task in tasks]


def test_a_poisoned_checkpoint_neither_sinks_the_job_nor_hides_in_a_verified_result(tmp_path: Path,
                                                                                    procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    manifest = tmp_path / "train.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: poisoned}\n"
                        "spec:\n  task: mlp_train\n  sweep: {seed: [1, 2]}\n"
                        "  params: {samples: 256, epochs: 2, hidden_size: 16}\n  policy: {retries: 0}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      not a checkpoint")
    task_ids = asyncio.run(poison(url, garbage))
    assert len(task_ids) == 2
    view = job_view(url, user, job["id"])
    assert [t["checkpoint"] is not None for t in view["task_list"]] == [False, True]   # unsigned: never recorded
    start_agent(procs, tmp_path, url, "honest")
    wait_for(lambda: job_view(url, user, job["id"])["state"] in ("succeeded", "failed"), "the honest agent to finish",
             timeout_s=240, diagnose=procs.logs_text)
    view = job_view(url, user, job["id"])
    assert view["state"] == "succeeded", view
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "--json", home=user).stdout)
    assert [row["verified"] for row in res["results"]] == [True, True]
    assert [row["resumed_from"] for row in res["results"]] == [None, None]   # both ran afresh in the end
