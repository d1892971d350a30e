"""The agent's local blob cache: verified downloads, bounded size, least-recently-used eviction.

A blob enters the cache only after its bytes hash to its name (download to a temp file, verify,
``os.replace``), so a tampered or truncated download leaves nothing behind. The last access time
is the file's mtime (touched on every hit), so the LRU order survives restarts. A blob that a
running task uses is pinned and never evicted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from agent.client.board import error_from_response
from hub.blobs import CHUNK_BYTES, check_sha256
from security.errors import (
    BadRequest,
    PanalError,
    PayloadTooLarge,
)

__all__ = ["BlobCache", "Fetch", "download_blob", "hash_file", "response_error"]

log = logging.getLogger(__name__)

#: ``fetch(sha256, dest)`` writes the blob's bytes to ``dest`` (e.g. :func:`download_blob`).
Fetch = Callable[[str, Path], Awaitable[None]]

_TMP_DIR = ".tmp"
_MAX_ERROR_BODY = 64 * 1024


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex and size of a file, read in chunks (blocking: call it in a thread)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class BlobCache:
    """Verified blobs under ``root``, at most ``max_bytes`` in total except while pinned."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._tmp = root / _TMP_DIR
        self._entries: OrderedDict[str, int] | None = None  # sha -> size, least recent first
        self._pins: Counter[str] = Counter()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._load_lock = asyncio.Lock()

    def path(self, sha256_hex: str) -> Path:
        return self.root / check_sha256(sha256_hex)

    @property
    def total_bytes(self) -> int:
        return sum(self._entries.values()) if self._entries else 0

    def __contains__(self, sha256_hex: str) -> bool:
        return self._entries is not None and sha256_hex in self._entries

    @contextmanager
    def pin(self, sha256_hex: str) -> Iterator[None]:
        """Keep ``sha256_hex`` from being evicted while the block runs (pins nest)."""
        self._pins[sha256_hex] += 1
        try:
            yield
        finally:
            self._pins[sha256_hex] -= 1
            if not self._pins[sha256_hex]:
                del self._pins[sha256_hex]

    @asynccontextmanager
    async def use(self, sha256_hex: str, fetch: Fetch) -> AsyncIterator[Path]:
        """``async with cache.use(sha, fetch) as path:`` the blob stays cached inside the block."""
        with self.pin(sha256_hex):
            yield await self.get(sha256_hex, fetch)

    async def get(self, sha256_hex: str, fetch: Fetch) -> Path:
        """Return the local path of a verified copy, fetching it on a miss.

        Raises BadRequest ``digest_mismatch`` if the fetched bytes do not hash to the name; the
        cache is then unchanged. Without a pin (:meth:`use`) a later ``get`` may evict the file.
        """
        path = self.path(sha256_hex)
        entries = await self._load()
        with self.pin(sha256_hex):
            async with self._lock(sha256_hex):
                if sha256_hex in entries and await asyncio.to_thread(_touch, path):
                    entries.move_to_end(sha256_hex)
                    return path
                entries.pop(sha256_hex, None)
                entries[sha256_hex] = await self._fetch(sha256_hex, path, fetch)
            await self._evict()
        return path

    async def _fetch(self, sha: str, path: Path, fetch: Fetch) -> int:
        tmp = self._tmp / f"{sha}.{secrets.token_hex(8)}.part"
        try:
            await fetch(sha, tmp)
            actual, size = await asyncio.to_thread(hash_file, tmp)
            if actual != sha:
                raise BadRequest(f"downloaded blob {sha} hashes to {actual}: corrupted or tampered "
                                 "with in transit; not cached", code="digest_mismatch",
                                 details={"expected": sha, "actual": actual})
            await asyncio.to_thread(os.replace, tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # one unlink(2), also safe while being cancelled
            raise
        return size

    async def _evict(self) -> None:
        entries = await self._load()
        total = sum(entries.values())
        victims: list[str] = []
        for sha, size in entries.items():
            if total <= self.max_bytes:
                break
            if not self._pins[sha] and sha not in self._locks:
                victims.append(sha)
                total -= size
        for sha in victims:
            del entries[sha]
        if victims:
            await asyncio.to_thread(_unlink_all, [self.root / sha for sha in victims])
            log.debug("blob cache evicted %d blob(s), %d bytes left", len(victims), total)
        if total > self.max_bytes:
            log.info("blob cache holds %d bytes (limit %d): the rest is pinned", total, self.max_bytes)

    async def _load(self) -> OrderedDict[str, int]:
        async with self._load_lock:
            if self._entries is None:
                self._entries = await asyncio.to_thread(self._scan)
            return self._entries

    def _scan(self) -> OrderedDict[str, int]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self._tmp):  # leftovers of a crashed download
            Path(entry.path).unlink(missing_ok=True)
        found = []
        for entry in os.scandir(self.root):
            if entry.is_file() and len(entry.name) == 64:
                try:
                    check_sha256(entry.name)
                except BadRequest:
                    continue
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
        return OrderedDict((sha, size) for _, sha, size in sorted(found))

    @asynccontextmanager
    async def _lock(self, sha: str) -> AsyncIterator[None]:
        """One download per blob at a time; the lock entry lives only while someone uses it."""
        lock, users = self._locks.get(sha, (asyncio.Lock(), 0))
        self._locks[sha] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[sha]
            if users == 1:
                del self._locks[sha]
            else:
                self._locks[sha] = (lock, users - 1)


def _touch(path: Path) -> bool:
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def response_error(resp: aiohttp.ClientResponse) -> PanalError:
    """The PanalError a board's error response stands for (JSON or msgpack body, else its text)."""
    raw = b""
    while len(raw) < _MAX_ERROR_BODY and (chunk := await resp.content.read(_MAX_ERROR_BODY - len(raw))):
        raw += chunk
    body: Any = None
    try:
        if resp.content_type == "application/msgpack":
            body = msgpack.unpackb(raw)
        elif resp.content_type == "application/json":
            body = json.loads(raw)
    except ValueError:
        body = None
    if not (isinstance(body, dict) and isinstance(body.get("message"), str)):
        body = {"message": raw.decode(errors="replace").strip() or resp.reason or ""}
    error = error_from_response(resp.status, body)
    error.message = f"{resp.method} {resp.url.path}: HTTP {resp.status}: {error.message}"
    error.args = (error.message,)
    return error


async def download_blob(session: aiohttp.ClientSession, base_url: str, sha: str, dest: Path,
                        headers: Mapping[str, str], max_bytes: int | None = None) -> None:
    """Stream blob ``sha`` from the board at ``base_url`` into ``dest`` (not verified: the cache does).

    ``headers`` sign ``GET /v1/blobs/{sha}`` over an empty body. ``max_bytes`` bounds what a
    misbehaving board can write to our disk.
    """
    url = f"{base_url.rstrip('/')}/v1/blobs/{check_sha256(sha)}"
    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise await response_error(resp)
        if max_bytes is not None and (resp.content_length or 0) > max_bytes:
            raise PayloadTooLarge(f"blob {sha} is {resp.content_length} bytes, over the {max_bytes} "
                                  "allowed", code="blob_too_large")
        f = await asyncio.to_thread(dest.open, "wb")
        try:
            written = 0
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise PayloadTooLarge(f"blob {sha} is over the {max_bytes} bytes allowed",
                                          code="blob_too_large")
                await asyncio.to_thread(f.write, chunk)
        finally:
            f.close()  # the file's lock waits for a write still running in a thread
