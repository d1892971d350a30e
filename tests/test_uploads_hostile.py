"""Hostile input to the resumable upload routes over real TLS: every malformed request is a 4xx with
a clear code (never a 500), another key's session is as missing as an expired one, and a chunk sent
twice at once cannot count twice."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yarl
from conftest import InProcessHub
from test_blob_access import member
from test_uploads import CHUNK, big_file, call

from agent.client.board import BoardClient
from security.httpsig import content_digest, sign_request_digest


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[InProcessHub]:
    hub = InProcessHub(tmp_path, blob_gc_interval_s=3600, upload_chunk_bytes=CHUNK)
    await hub.start()
    yield hub
    await hub.stop()


@pytest.fixture
async def sub(started: InProcessHub) -> AsyncIterator[BoardClient]:
    client = await member(started, "submitter")
    yield client
    await client.close()


async def raw(client: BoardClient, method: str, path: str, query: dict[str, str] | None = None,
              body: bytes = b"", headers: dict[str, str] | None = None, digest: str | None = None) -> tuple[int, Any]:
    """A signed request whose headers the test may spoil after signing."""
    url = yarl.URL(client.address.url + path, encoded="%" in path).with_query(query or {})
    signed = sign_request_digest(client.identity, method, url.raw_path, url.query_string,
                                 digest if digest is not None else content_digest(body))
    async with client.session().request(method, url, data=body or None,
                                        headers={**signed, "Accept": "application/json", **(headers or {})}) as resp:
        try:
            return resp.status, await resp.json()
        except Exception:
            return resp.status, await resp.text()


async def open_session(sub: BoardClient, tmp_path: Path) -> tuple[str, bytes]:
    sha, path = big_file(tmp_path)
    data = path.read_bytes()
    status, state = await call(sub, "POST", "/v1/uploads", {"sha256": sha, "size": str(len(data))})
    assert status == 201, state
    return state["upload_id"], data


@pytest.mark.parametrize("query", [
    {"sha256": "zz", "size": "10"}, {"sha256": "a" * 64, "size": "ten"}, {"sha256": "a" * 64},
    {"sha256": "a" * 64, "size": "-5"}, {"sha256": "a" * 64, "size": "9" * 40}, {"size": "10"},
    {"sha256": "a" * 64, "size": "1e9"}, {"sha256": "A" * 64 + "\u0661", "size": "1"},
])
async def test_a_malformed_open_is_a_4xx_with_a_code(sub: BoardClient, query: dict[str, str]) -> None:
    status, body = await raw(sub, "POST", "/v1/uploads", query)
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and body.get("error"), body


@pytest.mark.parametrize("index", ["abc", "1e3", "9" * 400, "%20", "0x1", "\u0661", "1_0", "-1", "00"])
async def test_a_malformed_chunk_index_is_a_4xx_or_harmless(sub: BoardClient, tmp_path: Path, index: str) -> None:
    uid, data = await open_session(sub, tmp_path)
    status, body = await raw(sub, "PUT", f"/v1/uploads/{uid}/{index}", body=data[:CHUNK])
    assert status < 500, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and body.get("error"), body
    state = (await call(sub, "GET", f"/v1/uploads/{uid}"))[1]
    assert state["received"] in (0, CHUNK)
    if index not in ("00",):   # only a plain number names chunk 0
        assert state["received"] == 0, (index, state)


@pytest.mark.parametrize("digest", ["", "sha-256=:!!!:", "sha-256=:" + "A" * 43 + "=:", "md5=:abc:",
                                    "sha-256=:" + "A" * 44 + ":" + "x" * 5000])
async def test_a_malformed_content_digest_is_a_4xx(sub: BoardClient, tmp_path: Path, digest: str) -> None:
    uid, data = await open_session(sub, tmp_path)
    status, body = await raw(sub, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK],
                             headers={"Content-Digest": digest}, digest=digest)
    assert 400 <= status < 500, (status, body)


async def test_a_chunk_longer_or_shorter_than_its_place_is_refused_and_not_kept(sub: BoardClient,
                                                                                tmp_path: Path) -> None:
    uid, data = await open_session(sub, tmp_path)
    for body in (data[:CHUNK + 10], data[:CHUNK - 10], b""):
        status, reply = await raw(sub, "PUT", f"/v1/uploads/{uid}/0", body=body)
        assert 400 <= status < 500, (status, reply)
    assert (await call(sub, "GET", f"/v1/uploads/{uid}"))[1]["received"] == 0


async def test_another_keys_session_is_not_found_for_reading_or_writing(started: InProcessHub, sub: BoardClient,
                                                                        tmp_path: Path) -> None:
    owner = sub
    other = await member(started, "submitter")
    uid, data = await open_session(owner, tmp_path)
    assert (await call(other, "GET", f"/v1/uploads/{uid}"))[0] == 404
    assert (await raw(other, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK]))[0] == 404
    assert (await call(owner, "GET", f"/v1/uploads/{uid}"))[1]["received"] == 0
    await other.close()


async def test_one_chunk_sent_twice_at_once_counts_once(sub: BoardClient, tmp_path: Path) -> None:
    uid, data = await open_session(sub, tmp_path)
    results = await asyncio.gather(*(raw(sub, "PUT", f"/v1/uploads/{uid}/0", body=data[:CHUNK])
                                     for _ in range(8)))
    assert all(status < 500 for status, _ in results), results
    assert (await call(sub, "GET", f"/v1/uploads/{uid}"))[1]["received"] == CHUNK
    for index in range(1, 6):   # and the rest still completes the blob under its name
        status, reply = await raw(sub, "PUT", f"/v1/uploads/{uid}/{index}",
                                  body=data[index * CHUNK:(index + 1) * CHUNK])
        assert status in (200, 201), reply
    assert reply["sha256"] == hashlib.sha256(data).hexdigest()
