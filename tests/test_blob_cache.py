"""The agent's verified LRU blob cache and its downloads: eviction and pinning, one download for concurrent
gets, a tampered or missing blob refused, a board's error body read (the board side, its store and routes, over
real loopback with the fixtures of tests/test_blobs.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
import test_blobs
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_blobs import MB, Board, sha, write_random

from agent.client.blobcache import BlobCache, response_error
from agent.client.blobupload import upload_file
from security.errors import BadRequest, PanalError

board, session = test_blobs.board, test_blobs.session   # the fixtures: a real board's blob routes, a client


class FakeSource:
    """A ``fetch`` that serves blobs from memory and counts downloads (the HTTP path is tested above)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetched: list[str] = []

    async def __call__(self, blob: str, dest: Path) -> None:
        self.fetched.append(blob)
        await asyncio.to_thread(dest.write_bytes, self.blobs[blob])


async def test_cache_lru_eviction_and_pinning(tmp_path: Path) -> None:
    data = {sha(bytes([i]) * 1000): bytes([i]) * 1000 for i in range(5)}
    a, b, c, d, e = data
    source = FakeSource(data)
    cache = BlobCache(tmp_path, max_bytes=3000)
    for blob in (a, b, c):
        await cache.get(blob, source)
    await cache.get(a, source)  # a hit: a becomes the most recent
    assert source.fetched == [a, b, c]
    await cache.get(d, source)  # over budget: b is the least recently used
    assert b not in cache and not cache.path(b).exists()
    assert all(blob in cache for blob in (a, c, d))
    assert cache.total_bytes == 3000

    async with cache.use(c, source) as path:  # c is pinned while in use
        await cache.get(e, source)
        await cache.get(b, source)
        assert path.exists() and c in cache
        assert cache.total_bytes == 3000
    await cache.get(a, source)
    assert c not in cache  # unpinned, and now the oldest
    assert cache.total_bytes <= 3000

    # a restarted agent finds its cache, in the same LRU order
    again = BlobCache(tmp_path, max_bytes=3000)
    await again.get(b, source)
    assert source.fetched.count(b) == 2  # no new download
    assert again.total_bytes == cache.total_bytes


async def test_cache_single_download_for_concurrent_gets(tmp_path: Path) -> None:
    data = {sha(b"shared"): b"shared"}
    source = FakeSource(data)
    cache = BlobCache(tmp_path, max_bytes=MB)
    paths = await asyncio.gather(*(cache.get(sha(b"shared"), source) for _ in range(5)))
    assert len(set(paths)) == 1 and source.fetched == [sha(b"shared")]


async def test_tampered_download_rejected(board: Board, session: aiohttp.ClientSession,
                                          tmp_path: Path) -> None:
    src = tmp_path / "weights.safetensors"
    blob = write_random(src, MB + 7)
    await upload_file(session, board.url, src, board.sign)
    with board.store.path(blob).open("r+b") as f:  # someone flips a byte on the board's disk
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    cache = BlobCache(tmp_path / "cache", max_bytes=100 * MB)
    with pytest.raises(BadRequest) as info:
        await cache.get(blob, board.fetcher(session))
    assert info.value.code == "digest_mismatch" and "tampered" in info.value.message
    assert blob not in cache
    assert os.listdir(tmp_path / "cache") == [".tmp"]
    assert os.listdir(tmp_path / "cache" / ".tmp") == []


async def test_download_missing_blob_is_not_found(board: Board, session: aiohttp.ClientSession,
                                                  tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache", max_bytes=MB)
    with pytest.raises(PanalError) as info:
        await cache.get(sha(b"nope"), board.fetcher(session))
    assert info.value.status == 404 and info.value.code == "blob_not_found"
    assert os.listdir(tmp_path / "cache" / ".tmp") == []


async def test_response_error_reads_msgpack_bodies() -> None:
    import msgpack  # the board's default body format

    async def forbidden(request: web.Request) -> web.Response:
        body = msgpack.packb({"error": "forbidden", "message": "key abc may not upload"})
        return web.Response(body=body, status=403, content_type="application/msgpack")

    app = web.Application()
    app.router.add_get("/x", forbidden)
    async with TestServer(app) as server, aiohttp.ClientSession() as s, s.get(server.make_url("/x")) as r:
        err = await response_error(r)
    assert err.status == 403 and err.code == "forbidden"
    assert "key abc may not upload" in err.message
