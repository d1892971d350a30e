"""Resumable uploads (hub/uploads.py, hub/upload_routes.py) over real TLS against an in-process board:
chunks verified on arrival, a dropped connection resumed from the chunk the board needs, and
unfinished sessions bounded per key, against the quota, and in time."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from conftest import InProcessHub
from helpers import FakeClock
from test_blob_access import member

from agent.client.blobcache import hash_file
from agent.client.blobupload import upload_file
from agent.client.board import BoardClient
from hub.blobs import BlobStore
from hub.uploads import UploadSessions
from security.errors import PanalError, Unavailable
from security.httpsig import content_digest, sign_request_digest

CHUNK = 64 * 1024


@pytest.fixture
async def started(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    hub = InProcessHub(tmp_path, blob_gc_interval_s=3600, upload_chunk_bytes=CHUNK, **getattr(request, "param", {}))
    await hub.start()
    yield hub
    await hub.stop()


def big_file(tmp_path: Path, size: int = 5 * CHUNK + 100) -> tuple[str, Path]:
    path = tmp_path / "big.bin"
    path.write_bytes(hashlib.sha256(b"seed").digest() * (size // 32) + b"t" * (size % 32))
    return hash_file(path)[0], path


async def call(client: BoardClient, method: str, path: str, query: dict[str, str] | None = None,
               body: bytes | AsyncIterator[bytes] = b"", digest: str | None = None) -> tuple[int, Any]:
    url = yarl.URL(client.address.url + path).with_query(query or {})
    headers = sign_request_digest(client.identity, method, url.path, url.query_string,
                                  digest or content_digest(body if isinstance(body, bytes) else b""))
    async with client.session().request(method, url, data=body or None,
                                        headers={**headers, "Accept": "application/json"}) as resp:
        return resp.status, await resp.json()


def sign_for(client: BoardClient) -> Any:
    return lambda method, path, query, digest: sign_request_digest(client.identity, method, path, query, digest)


async def test_an_upload_resumes_after_a_dropped_connection_from_the_chunk_the_board_needs(
        started: InProcessHub, tmp_path: Path) -> None:
    hub = started
    assert hub.server is not None
    sub = await member(hub, "submitter")
    sha, path = big_file(tmp_path)
    data = path.read_bytes()
    status, state = await call(sub, "POST", "/v1/uploads", {"sha256": sha, "size": str(len(data))})
    assert status == 201 and state["chunk_bytes"] == CHUNK and state["chunks"] == 6
    uid = state["upload_id"]
    status, state = await call(sub, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK])
    assert status == 200 and state["next_chunk"] == 1

    async def half_then_drop() -> AsyncIterator[bytes]:
        yield data[CHUNK:CHUNK + CHUNK // 2]
        raise ConnectionResetError("the line went down")

    with pytest.raises((aiohttp.ClientError, ConnectionResetError)):
        await call(sub, "PUT", f"/v1/uploads/{uid}/1", body=half_then_drop(),
                   digest=content_digest(data[CHUNK:2 * CHUNK]))

    # the board counts only whole, verified chunks (a chunk still arriving answers chunk_busy: the client asks again)
    assert (await call(sub, "GET", f"/v1/uploads/{uid}"))[1]["received"] == CHUNK
    sent: list[int] = []
    assert await upload_file(sub.session(), sub.address.url, path, sign_for(sub), sent.append, resumable_from=0) == sha
    assert sent[0] == CHUNK and sum(sent) == len(data)     # chunk 0 was not sent again
    assert hub.server.blobs.path(sha).read_bytes() == data
    assert (await call(sub, "GET", f"/v1/uploads/{uid}"))[0] == 404   # finished sessions are gone
    await sub.close()


async def test_a_chunk_whose_bytes_do_not_match_its_signed_digest_is_refused_and_not_kept(
        started: InProcessHub, tmp_path: Path) -> None:
    hub = started
    sub, other = await member(hub, "submitter"), await member(hub, "submitter")
    sha, path = big_file(tmp_path)
    data = path.read_bytes()
    _, state = await call(sub, "POST", "/v1/uploads", {"sha256": sha, "size": str(len(data))})
    uid = state["upload_id"]
    forged = b"\0" * CHUNK
    status, body = await call(sub, "PUT", f"/v1/uploads/{uid}/0", body=forged, digest=content_digest(data[:CHUNK]))
    assert status == 400 and body["error"] == "digest_mismatch" and "resend it" in body["message"]
    assert (await call(sub, "GET", f"/v1/uploads/{uid}"))[1]["received"] == 0
    # another key cannot see or feed this session; chunks out of order are refused
    assert (await call(other, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK]))[0] == 404
    status, body = await call(sub, "PUT", f"/v1/uploads/{uid}/2", body=data[2 * CHUNK:3 * CHUNK])
    assert status == 409 and body["error"] == "wrong_chunk"
    status, body = await call(sub, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK - 1])
    assert status == 400 and body["error"] == "size_mismatch"
    assert (await call(sub, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK]))[1]["next_chunk"] == 1
    for client in (sub, other):
        await client.close()


@pytest.mark.parametrize("started", [{"upload_sessions_per_key": 2, "blob_quota_bytes_per_key": 10 * CHUNK,
                                      "max_blob_bytes": 8 * CHUNK}], indirect=True)
async def test_unfinished_sessions_count_against_the_keys_quota_and_cap(started: InProcessHub,
                                                                          tmp_path: Path) -> None:
    hub = started
    sub = await member(hub, "submitter")
    status, body = await call(sub, "POST", "/v1/uploads", {"sha256": "a" * 64, "size": str(9 * CHUNK)})
    assert status == 413 and body["error"] == "blob_too_large"           # the board's cap, before any byte
    assert (await call(sub, "POST", "/v1/uploads", {"sha256": "a" * 64, "size": str(6 * CHUNK)}))[0] == 201
    status, body = await call(sub, "POST", "/v1/uploads", {"sha256": "b" * 64, "size": str(6 * CHUNK)})
    assert status == 429 and body["error"] == "blob_quota_exceeded"      # 6 + 6 chunks > the 10 allowed
    assert (await call(sub, "POST", "/v1/uploads", {"sha256": "b" * 64, "size": str(CHUNK)}))[0] == 201
    status, body = await call(sub, "POST", "/v1/uploads", {"sha256": "c" * 64, "size": "1"})
    assert status == 429 and body["error"] == "too_many_upload_sessions"
    # opening the same blob again is resuming it, not a new session
    assert (await call(sub, "POST", "/v1/uploads", {"sha256": "a" * 64, "size": str(6 * CHUNK)}))[0] == 200
    await sub.close()


async def test_an_idle_session_expires_with_its_part_file_its_space_and_its_quota(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=10**6, max_total_bytes=10**6, fsync=False)
    clock = FakeClock()
    counted: dict[str, int] = {}

    async def begin(key: str, size: int | None) -> None:
        counted[key] = counted.get(key, 0) + (size or 0)

    def end(key: str, size: int | None) -> None:
        counted[key] -= size or 0

    sessions = UploadSessions(store, chunk_bytes=CHUNK, ttl_s=60, per_key=4, most=8, begin=begin, end=end,
                              clock=clock)
    idle, _ = await sessions.open("stranger", "a" * 64, 900_000)
    chunk = b"c" * CHUNK
    await sessions.put_chunk(idle, 0, hashlib.sha256(chunk).hexdigest(), _once(chunk), CHUNK)
    with pytest.raises(Unavailable, match="blob store is full"):          # its verified bytes hold space
        await sessions.open("honest", "b" * 64, 10**6 - 1000)
    clock.now = 59
    live, _ = await sessions.open("honest", "c" * 64, 50_000)
    sessions.get("stranger", idle.id)                                   # asking does not keep it alive
    assert idle.part.exists() and counted == {"stranger": 900_000, "honest": 50_000}
    clock.now = 61
    assert sessions.expire() == [idle]
    assert not idle.part.exists() and counted["stranger"] == 0 and live.id in sessions.sessions
    await sessions.open("honest", "b" * 64, 10**6 - 1000)                # the space is free again


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def test_upload_settings_that_would_never_expire_or_spin_are_refused() -> None:
    from hub.config import HubConfig
    from security.errors import BadRequest

    for bad in ({"upload_session_ttl_s": 0}, {"upload_chunk_bytes": 1000}, {"upload_sessions_per_key": 0}):
        with pytest.raises(BadRequest, match="upload_"):
            HubConfig.load(None, env={}, **bad)


@pytest.mark.parametrize("started", [{"upload_sessions_per_key": 2, "upload_sessions_per_address": 3}],
                         indirect=True)
async def test_one_address_cannot_fill_the_boards_sessions_with_many_keys_and_idle_agents_open_none(
        started: InProcessHub, tmp_path: Path) -> None:
    from agent.client.submitting import make_envelope, submit
    from jobs.manifest import Manifest

    hub = started
    assert hub.server is not None
    idle = await member(hub, "agent")
    status, body = await call(idle, "POST", "/v1/uploads", {"sha256": "a" * 64, "size": "1"})
    assert status == 403 and body["error"] == "no_lease_for_upload"   # registering is free; uploading is not
    worker, sub = await member(hub, "agent"), await member(hub, "submitter")
    await submit(sub, make_envelope(sub.identity, Manifest.from_dict({
        "apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "up"},
        "spec": {"task": "sleep", "sweep": {"seconds": [0.0]}}})))
    leased = await worker.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0})
    assert len(leased["tasks"]) == 1
    assert (await call(worker, "POST", "/v1/uploads", {"sha256": "b" * 64, "size": "1"}))[0] == 201
    # keys are free: three more of them from the same address get only what the address has left
    keys = [sub, await member(hub, "submitter"), await member(hub, "submitter")]
    opened = [(await call(k, "POST", "/v1/uploads", {"sha256": f"{i:x}" * 64, "size": "1"})) for i, k in
              enumerate(keys, start=3)]
    assert [s for s, _ in opened] == [201, 201, 429]
    assert opened[2][1]["error"] == "too_many_upload_sessions_from_address"
    for client in (idle, worker, *keys):
        await client.close()


async def test_the_per_address_cap_counts_each_address_apart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=10**6, max_total_bytes=10**6, fsync=False)
    sessions = UploadSessions(store, chunk_bytes=CHUNK, ttl_s=60, per_key=4, most=8, per_address=2)
    for i in range(2):
        await sessions.open(f"key{i}", f"{i}" * 64, 10, "192.0.2.1")
    with pytest.raises(PanalError, match="upload_sessions_per_address"):
        await sessions.open("key9", "9" * 64, 10, "192.0.2.1")
    await sessions.open("key9", "9" * 64, 10, "192.0.2.2")   # another host still gets its sessions
