"""Blob quotas, reading rights and prompt collection, over real TLS against an in-process board.

A blob's hash is no secret, so knowing it must grant nothing: only the uploader, the submitter whose job
names the blob, an agent whose current lease names it, or an admin may read it; anyone else gets the
same 404 as for a blob that does not exist.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import wait_for_async
from test_api import sleep_manifest

from agent.client.blobcache import hash_file
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, upload_inputs
from hub.app import AUTH_KEY
from hub.blobs import digest_header_for
from hub.config import HubConfig
from jobs.manifest import Manifest
from security.errors import BadRequest
from security.httpsig import content_digest, sign_request_digest
from security.identity import Identity
from security.records import SignedRecord


def blob_file(tmp_path: Path, name: str, size: int = 1000) -> tuple[str, Path]:
    path = tmp_path / name
    path.write_bytes(name.encode() * (size // len(name)) + b"x" * (size % len(name)))
    return hash_file(path)[0], path


def inference(model: str, data: str) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "blobs"},
                               "spec": {"task": "inference", "inputs": {
                                   "model": {"blob": model, "size": 1000, "name": "model.pt2"},
                                   "data": {"blob": data, "size": 1000, "name": "data.safetensors"}}}})


async def blob_request(client: BoardClient, method: str, sha: str, body: bytes = b"") -> tuple[int, Any]:
    """A signed GET/HEAD/PUT of a blob by ``client``'s key: (status, JSON error body or the bytes)."""
    path = f"/v1/blobs/{sha}"
    digest = digest_header_for(sha) if method == "PUT" else content_digest(b"")
    headers = sign_request_digest(client.identity, method, path, "", digest)
    async with client.session().request(method, client.address.url + path, data=body or None,
                                        headers={**headers, "Accept": "application/json"}) as resp:
        data = await resp.read()
        return resp.status, (await resp.json() if resp.content_type == "application/json" else data)


async def member(hub: InProcessHub, role: str) -> BoardClient:
    assert hub.address is not None and hub.server is not None
    ident = Identity.generate()
    client = BoardClient(hub.address, ident, retry_for_s=1)
    if role == "submitter":
        await hub.server.add_submitter(ident.public, role)
        await hub.server.app[AUTH_KEY].refresh_submitters(force=True)   # known at once, also to blob routes
    else:
        await client.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": role,
                                                 "capabilities": {"kinds": ["sleep", "inference"]}})
    return client


@pytest.fixture
async def started(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    hub = InProcessHub(tmp_path, blob_gc_interval_s=3600, **getattr(request, "param", {}))
    await hub.start()
    yield hub
    await hub.stop()


def test_defaults_cap_the_store_and_collect_within_minutes() -> None:
    config = HubConfig()
    assert config.max_blobs_total_bytes > 0 and config.blob_quota_bytes_per_key > 0
    assert config.blob_quota_count_per_key > 0
    assert config.blob_gc_grace_s <= 30 * 60 and config.blob_gc_interval_s <= 5 * 60


@pytest.mark.parametrize("started", [{"blob_quota_count_per_key": 2, "blob_quota_bytes_per_key": 5000}],
                         indirect=True)
async def test_uploads_past_a_keys_quota_are_refused_until_a_job_claims_them(started: InProcessHub,
                                                                             tmp_path: Path) -> None:
    hub = started
    assert hub.server is not None
    sub = await member(hub, "submitter")
    model, data, extra = (blob_file(tmp_path, n) for n in ("model", "data", "extra"))
    await upload_inputs(sub, [model, data])
    status, body = await blob_request(sub, "PUT", extra[0], extra[1].read_bytes())
    assert status == 429 and body["error"] == "blob_quota_exceeded"
    assert "blob_quota_count_per_key is 2" in body["message"]
    big = blob_file(tmp_path, "big", 6000)
    other = await member(hub, "submitter")
    status, body = await blob_request(other, "PUT", big[0], big[1].read_bytes())
    assert status == 429 and "blob_quota_bytes_per_key is 5000" in body["message"]
    with pytest.raises(BadRequest, match="blob_quota_count_per_key"):   # what `panal submit` shows
        await upload_inputs(sub, [extra])
    # the job that names both uploads claims them: after a GC round they no longer count
    await submit(sub, make_envelope(sub.identity, inference(model[0], data[0])))
    await hub.server.collect_garbage()
    assert await hub.server.board.store.blob_usage(sub.identity.id) == (0, 0)
    await upload_inputs(sub, [extra])
    for client in (sub, other):
        await client.close()


async def test_only_the_uploader_the_jobs_submitter_and_the_leasing_agent_read_a_blob(
        started: InProcessHub, tmp_path: Path) -> None:
    hub = started
    assert hub.server is not None
    alice, mallory = await member(hub, "submitter"), await member(hub, "submitter")
    worker, stranger = await member(hub, "agent"), await member(hub, "agent")
    model, data = blob_file(tmp_path, "model"), blob_file(tmp_path, "data")
    await upload_inputs(alice, [model, data])
    absent = (await blob_request(mallory, "GET", "0" * 64))[1]
    for client in (mallory, worker, stranger):       # knowing the hash is not enough: same 404 as absent
        for method in ("GET", "HEAD"):
            status, body = await blob_request(client, method, model[0])
            assert status == 404, (client.identity.id, method)
        status, body = await blob_request(client, "GET", model[0])
        assert body["error"] == absent["error"] == "blob_not_found"
        assert body["message"].replace(model[0], "X") == absent["message"].replace("0" * 64, "X")
    # nor is naming it in a job: the same error as a blob the board does not have
    with pytest.raises(BadRequest) as refused:
        await submit(mallory, make_envelope(mallory.identity, inference(model[0], data[0])))
    assert refused.value.code == "missing_blob"
    job = await submit(alice, make_envelope(alice.identity, inference(model[0], data[0])))
    assert (await blob_request(alice, "GET", model[0]))[1] == model[1].read_bytes()
    # the agent that leases the task reads its inputs, and only while it holds the lease
    [task] = (await worker.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
    assert task["job_id"] == job["id"]
    assert (await blob_request(worker, "GET", data[0]))[1] == data[1].read_bytes()
    assert (await blob_request(stranger, "GET", data[0]))[0] == 404
    # a checkpoint naming a blob the agent did not upload is ignored (else it would open it to others)
    await worker.call("POST", "/v1/heartbeat", {"leases": [
        {"task_id": task["task_id"], "lease_id": task["lease_id"], "checkpoint": model[0]}]})
    live = hub.server.board.view.task(task["task_id"])
    assert live is not None and live.checkpoint is None
    await worker.call("POST", f"/v1/tasks/{task['task_id']}/release", {"lease_id": task["lease_id"]})
    assert (await blob_request(worker, "GET", data[0]))[0] == 404
    for client in (alice, mallory, worker, stranger):
        await client.close()


async def test_a_result_naming_someone_elses_blob_does_not_open_it_to_the_jobs_submitter(
        started: InProcessHub, tmp_path: Path) -> None:
    hub = started
    alice, mallory = await member(hub, "submitter"), await member(hub, "submitter")
    accomplice = await member(hub, "agent")
    secret = blob_file(tmp_path, "secret")
    await upload_inputs(alice, [secret])
    job = await submit(mallory, make_envelope(mallory.identity, sleep_manifest(1)))
    [task] = (await accomplice.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
    record = SignedRecord.sign(accomplice.identity, {
        "task_id": task["task_id"], "job_id": job["id"], "lease_id": task["lease_id"], "attempt": task["attempt"],
        "agent_id": accomplice.identity.id, "status": "ok", "values": {},
        "outputs": {"loot": {"sha256": secret[0], "size": 1000, "name": "loot.bin"}}}).to_wire()
    await accomplice.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    assert (await mallory.call("GET", f"/v1/jobs/{job['id']}"))["job"]["state"] == "succeeded"
    assert (await blob_request(mallory, "GET", secret[0]))[0] == 404
    assert (await blob_request(alice, "GET", secret[0]))[0] == 200
    for client in (alice, mallory, accomplice):
        await client.close()


async def test_admins_read_every_blob(tmp_path: Path) -> None:
    admin_key = Identity.generate()
    hub = InProcessHub(tmp_path, admins=(admin_key.id,))
    server = await hub.start()
    try:
        alice = await member(hub, "submitter")
        await server.add_submitter(admin_key.public, "admin")
        await server.app[AUTH_KEY].refresh_submitters(force=True)
        assert hub.address is not None
        admin = BoardClient(hub.address, admin_key, retry_for_s=1)
        model = blob_file(tmp_path, "model")
        await upload_inputs(alice, [model])
        assert (await blob_request(admin, "GET", model[0]))[0] == 200
        await alice.close()
        await admin.close()
    finally:
        await hub.stop()


def age(hub: InProcessHub, sha: str, seconds: float) -> None:
    assert hub.server is not None
    past = time.time() - seconds
    os.utime(hub.server.blobs.path(sha), (past, past))


@pytest.mark.parametrize("started", [{"blob_gc_grace_s": 60}], indirect=True)
async def test_gc_keeps_an_upload_through_its_grace_and_collects_it_after(started: InProcessHub,
                                                                          tmp_path: Path) -> None:
    hub = started
    server = hub.server
    assert server is not None
    sub = await member(hub, "submitter")
    model, data, orphan = (blob_file(tmp_path, n) for n in ("model", "data", "orphan"))
    await upload_inputs(sub, [model, data, orphan])
    assert await server.collect_garbage() == []          # just uploaded: a submit may be on its way
    for sha, _ in (model, data, orphan):
        age(hub, sha, 120)
    await upload_inputs(sub, [model, data])               # `panal submit`'s HEAD renews the grace...
    await submit(sub, make_envelope(sub.identity, inference(model[0], data[0])))   # ...up to the submit
    assert await server.collect_garbage() == [orphan[0]]
    assert server.blobs.exists(model[0]) and server.blobs.exists(data[0])
    assert await server.board.store.blob_usage(sub.identity.id) == (0, 0)      # claimed or collected
    assert (await blob_request(sub, "GET", orphan[0]))[0] == 404
    await sub.close()


async def test_the_board_collects_unreferenced_uploads_on_its_own(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, blob_gc_grace_s=0.5, blob_gc_interval_s=0.1)
    server = await hub.start()
    try:
        sub = await member(hub, "submitter")
        orphan = blob_file(tmp_path, "orphan")
        await upload_inputs(sub, [orphan])
        await wait_for_async(lambda: not server.blobs.exists(orphan[0]), "the unreferenced upload to go")
        await sub.close()
    finally:
        await hub.stop()


@pytest.mark.parametrize("started", [{"blob_quota_bytes_per_key": 1_000_000}], indirect=True)
async def test_an_upload_without_content_length_cannot_bypass_the_byte_quota(started: InProcessHub) -> None:
    """Review finding: chunked uploads were counted as 0 bytes; six concurrent 900 KB uploads under a 1 MB
    quota were all stored (6.3 MB)."""
    import asyncio
    import hashlib
    agent = await member(started, "agent")

    async def chunked(data: bytes) -> int:
        sha = hashlib.sha256(data).hexdigest()
        path = f"/v1/blobs/{sha}"
        headers = sign_request_digest(agent.identity, "PUT", path, "", digest_header_for(sha))

        async def gen() -> Any:
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]
        async with agent.session().put(agent.address.url + path, data=gen(), headers=headers) as resp:
            return resp.status

    statuses = await asyncio.gather(*(chunked(os.urandom(900_000)) for _ in range(4)))
    assert started.server is not None
    used_bytes, _ = await started.server.board.store.blob_usage(agent.identity.id)
    assert used_bytes <= 1_000_000 and set(statuses) == {411}, statuses
    await agent.close()
