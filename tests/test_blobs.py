"""Blob store, its HTTP routes and the agent's upload, over real loopback (the agent's verified LRU cache and
downloads: tests/test_blob_cache.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from helpers import wait_for_async

from agent.client.blobcache import BlobCache, download_blob
from agent.client.blobupload import upload_file
from hub.blob_routes import add_blob_routes
from hub.blobs import CHUNK_BYTES, BlobStore, digest_header_for
from hub.http import error_middleware
from security.errors import BadRequest, PanalError, PayloadTooLarge, Unauthorized
from security.httpsig import content_digest, sign_request, sign_request_digest, verify_request
from security.identity import Identity
from security.replay import ReplayCache

MB = 1024 * 1024


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes in chunks (never one big buffer); return their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MB, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Board:
    """A real aiohttp server with the blob routes and real signature checks."""

    def __init__(self, store: BlobStore, identity: Identity) -> None:
        self.store = store
        self.identity = identity
        self.replay = ReplayCache(skew_s=300)
        self.server: BaseTestServer | None = None

    async def authorize(self, request: web.Request, body_digest: str | None) -> str:
        keys = {self.identity.id: self.identity.public}
        params = verify_request(request.method, request.path, request.query_string, request.headers,
                                b"", keys.get, skew_s=300, body_digest=body_digest)
        self.replay.check(params.keyid, params.nonce)
        return params.keyid

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        add_blob_routes(app, self.store, self.authorize)
        return app

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def sign(self, method: str, path: str, query: str, digest: str) -> dict[str, str]:
        return sign_request_digest(self.identity, method, path, query, digest)

    def get_headers(self, blob: str, method: str = "GET") -> dict[str, str]:
        return sign_request(self.identity, method, f"/v1/blobs/{blob}", "", b"")

    def fetcher(self, session: aiohttp.ClientSession) -> Callable[[str, Path], Awaitable[None]]:
        async def fetch(blob: str, dest: Path) -> None:
            await download_blob(session, self.url, blob, dest, self.get_headers(blob))
        return fetch


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[Board]:
    b = Board(BlobStore(tmp_path / "hub", max_blob_bytes=100 * MB, max_total_bytes=None, fsync=False),
              Identity.generate())
    async with TestServer(b.app()) as server:
        b.server = server
        yield b


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def tmp_files(store: BlobStore) -> list[str]:
    return os.listdir(store.root / ".tmp")


# -- signing additions ------------------------------------------------------------------------


def test_sign_request_digest_matches_sign_request_and_verifies_streamed() -> None:
    ident = Identity.generate()
    body = b"hello blob"
    headers = sign_request_digest(ident, "PUT", "/v1/blobs/x", "", content_digest(body))
    assert headers["content-digest"] == sign_request(ident, "PUT", "/v1/blobs/x", "", body)["content-digest"]
    keys = {ident.id: ident.public}
    # the body is not at hand: verify against the digest the server derived from the URL
    params = verify_request("PUT", "/v1/blobs/x", "", headers, b"", keys.get, 60,
                            body_digest=digest_header_for(sha(body)))
    assert params.keyid == ident.id
    with pytest.raises(Unauthorized, match="Content-Digest"):
        verify_request("PUT", "/v1/blobs/x", "", headers, b"", keys.get, 60,
                       body_digest=digest_header_for(sha(b"other")))


# -- HTTP round trips -------------------------------------------------------------------------


async def test_upload_download_round_trip(board: Board, session: aiohttp.ClientSession,
                                          tmp_path: Path) -> None:
    src = tmp_path / "model.pt2"
    size = 5 * MB + 12345  # several chunks and a ragged tail
    expected = write_random(src, size)
    sent: list[int] = []
    blob = await upload_file(session, board.url, src, board.sign, sent.append)
    assert blob == expected
    assert sum(sent) == size
    assert board.store.size(blob) == size
    assert tmp_files(board.store) == []

    async with session.head(f"{board.url}/v1/blobs/{blob}", headers=board.get_headers(blob, "HEAD")) as r:
        assert r.status == 200
        assert r.content_length == size
        assert r.headers["Repr-Digest"] == digest_header_for(blob)

    cache = BlobCache(tmp_path / "cache", max_bytes=100 * MB)
    local = await cache.get(blob, board.fetcher(session))
    assert await asyncio.to_thread(lambda: hashlib.sha256(local.read_bytes()).hexdigest()) == blob


async def test_dedup(board: Board, session: aiohttp.ClientSession, tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    blob = write_random(src, 2 * MB)
    assert await upload_file(session, board.url, src, board.sign) == blob
    before = board.store.path(blob).stat()
    sent: list[int] = []
    assert await upload_file(session, board.url, src, board.sign, sent.append) == blob
    assert sent == [2 * MB]  # skipped after HEAD, reported as done
    after = board.store.path(blob).stat()
    assert after.st_ino == before.st_ino  # not rewritten; the HEAD renewed its GC grace (mtime) only
    assert after.st_mtime_ns >= before.st_mtime_ns

    # a direct PUT of a blob the board has: 200, created false, verified but not rewritten
    body = io.BytesIO(src.read_bytes())
    headers = board.sign("PUT", f"/v1/blobs/{blob}", "", digest_header_for(blob))
    async with session.put(f"{board.url}/v1/blobs/{blob}", data=body, headers=headers) as r:
        assert r.status == 200
        assert await r.json() == {"sha256": blob, "size": 2 * MB, "created": False}
    assert len(os.listdir(board.store.path(blob).parent)) == 1
    assert tmp_files(board.store) == []


async def test_wrong_digest_rejected_and_nothing_stored(board: Board,
                                                        session: aiohttp.ClientSession) -> None:
    claimed = sha(b"the real thing")
    headers = board.sign("PUT", f"/v1/blobs/{claimed}", "", digest_header_for(claimed))
    async with session.put(f"{board.url}/v1/blobs/{claimed}", data=b"something else", headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "digest_mismatch"
    assert not board.store.exists(claimed)
    assert tmp_files(board.store) == []

    # a Content-Digest that does not match the name is refused before the body is read
    other = sha(b"other")
    headers = board.sign("PUT", f"/v1/blobs/{claimed}", "", digest_header_for(other))
    async with session.put(f"{board.url}/v1/blobs/{claimed}", data=b"other", headers=headers) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "digest_mismatch" and "does not match the blob name" in body["message"]


async def test_bad_name_and_unsigned(board: Board, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{board.url}/v1/blobs/ABC") as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "bad_blob_name" and "64 lowercase hex" in body["message"]
    blob = sha(b"x")
    async with session.put(f"{board.url}/v1/blobs/{blob}", data=b"x") as r:
        assert r.status == 401
        assert board.store.exists(blob) is False
    async with session.get(f"{board.url}/v1/blobs/{blob}", headers=board.get_headers(blob)) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "blob_not_found"


async def test_size_cap_refuses_declared_length_at_once(board: Board,
                                                        session: aiohttp.ClientSession) -> None:
    board.store.max_blob_bytes = 1 * MB
    body = os.urandom(3 * MB)
    blob = sha(body)
    headers = board.sign("PUT", f"/v1/blobs/{blob}", "", digest_header_for(blob))
    async with session.put(f"{board.url}/v1/blobs/{blob}", data=io.BytesIO(body), headers=headers) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "blob_too_large"
    assert not board.store.exists(blob)
    assert tmp_files(board.store) == []


async def test_size_cap_stops_streamed_upload_early(board: Board, session: aiohttp.ClientSession) -> None:
    board.store.max_blob_bytes = 1 * MB
    blob = sha(b"never mind")
    produced = 0

    async def endless() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse up front
        nonlocal produced
        while produced < 200 * MB:
            produced += 64 * 1024
            yield b"\0" * (64 * 1024)

    headers = board.sign("PUT", f"/v1/blobs/{blob}", "", digest_header_for(blob))
    async with session.put(f"{board.url}/v1/blobs/{blob}", data=endless(), headers=headers) as r:
        assert r.status == 413
    assert not board.store.exists(blob)
    assert tmp_files(board.store) == []

    # the store itself stops pulling as soon as the cap is passed
    pulled = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 64 * 1024
            yield b"\0" * (64 * 1024)

    with pytest.raises(PayloadTooLarge):
        await board.store.put(blob, counted(), None)
    assert pulled <= 1 * MB + 64 * 1024
    assert tmp_files(board.store) == []


async def test_interrupted_upload_leaves_nothing(board: Board) -> None:
    assert board.server is not None
    blob = sha(b"a blob that never fully arrives")
    path = f"/v1/blobs/{blob}"
    headers = board.sign("PUT", path, "", digest_header_for(blob))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reader, writer = await asyncio.open_connection(board.server.host, board.server.port)
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {20 * MB}\r\n{head}\r\n".encode())
    for _ in range(3):
        writer.write(os.urandom(CHUNK_BYTES))
        await writer.drain()
    await wait_for_async(lambda: board.store._active_tmp, "the upload to be in progress")
    writer.transport.abort()  # the client dies mid-stream
    await wait_for_async(lambda: not board.store._active_tmp and not tmp_files(board.store),
                         "the aborted upload's temporary file to be removed")
    assert not board.store.exists(blob)
    del reader


# -- store ------------------------------------------------------------------------------------


async def chunks_of(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_store_put_size_mismatch_and_quota(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_blob_bytes=10 * MB, max_total_bytes=3 * MB, fsync=True)
    a = os.urandom(2 * MB)
    assert await store.put(sha(a), chunks_of(a), len(a)) == (len(a), True)
    assert await store.put(sha(a), chunks_of(a), len(a)) == (len(a), False)
    with pytest.raises(BadRequest) as info:
        await store.put(sha(a), chunks_of(a), len(a) + 1)
    assert info.value.code == "size_mismatch"
    b = os.urandom(2 * MB)
    with pytest.raises(PanalError) as full:
        await store.put(sha(b), chunks_of(b), None)
    assert full.value.status == 503 and full.value.code == "blob_store_full"
    assert not store.exists(sha(b)) and tmp_files(store) == []
    assert await store.delete(sha(a)) is True
    assert await store.total_bytes() == 0
    assert await store.put(sha(b), chunks_of(b), None) == (len(b), True)
    assert await store.total_bytes() == len(b)


async def test_gc_keeps_referenced_and_recent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_blob_bytes=MB, max_total_bytes=None, fsync=False)
    blobs = {name: name.encode() * 10 for name in ("referenced", "orphan", "recent")}
    for data in blobs.values():
        await store.put(sha(data), chunks_of(data), len(data))
    old = time.time() - 3600
    for name in ("referenced", "orphan"):
        os.utime(store.path(sha(blobs[name])), (old, old))
    stale_tmp = store.root / ".tmp" / "dead.part"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (old, old))

    deleted = await store.gc({sha(blobs["referenced"])}, grace_s=600)
    assert deleted == [sha(blobs["orphan"])]
    assert store.exists(sha(blobs["referenced"])) and store.exists(sha(blobs["recent"]))
    assert not store.exists(sha(blobs["orphan"]))
    assert not stale_tmp.exists()

    # re-uploading an old blob refreshes it, so a job about to be submitted keeps it
    os.utime(store.path(sha(blobs["recent"])), (old, old))
    await store.put(sha(blobs["recent"]), chunks_of(blobs["recent"]), None)
    assert await store.gc({sha(blobs["referenced"])}, grace_s=600) == []
    left = sorted(sha(blobs[name]) for name in ("referenced", "recent"))
    assert sorted(await store.gc(set(), grace_s=-1)) == left
    assert await store.total_bytes() == 0


# -- memory -----------------------------------------------------------------------------------


async def test_64mb_upload_and_download_stay_streamed(board: Board, session: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    """Server and client share this process: RSS must not grow by anything like the blob size."""
    src = tmp_path / "big.bin"
    size = 64 * MB
    expected = write_random(src, size)
    warm = tmp_path / "warm.bin"  # first use starts worker threads and malloc arenas: not growth
    write_random(warm, 4 * MB)
    warm_cache = BlobCache(tmp_path / "warm-cache", max_bytes=200 * MB)
    await warm_cache.get(await upload_file(session, board.url, warm, board.sign), board.fetcher(session))
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        blob = await upload_file(session, board.url, src, board.sign)
        cache = BlobCache(tmp_path / "cache", max_bytes=200 * MB)
        await cache.get(blob, board.fetcher(session))
    finally:
        done.set()
        await sampler
    assert blob == expected
    growth_mb = (peak - base) / MB
    assert growth_mb < 24, f"RSS grew by {growth_mb:.1f} MB while moving a 64 MB blob"
