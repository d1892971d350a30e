"""Content-addressed blob store: files named by their SHA-256, streamed to and from disk.

Uploads go to a temp file in chunks, hashed as they are written, and are renamed into place
(``os.replace``) only once the bytes match the name, so a reader never sees a partial or wrong
blob. Disk I/O and hashing run in worker threads; the event loop only moves chunks.

Layout: ``root/ab/abcdef...`` (two-level fan-out) and ``root/.tmp/`` for uploads in progress
(same filesystem, so the rename is atomic).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from security.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, Unavailable

__all__ = ["BlobStore", "check_sha256", "digest_header_for"]

CHUNK_BYTES = 1024 * 1024  # how much is buffered before one write/hash in a worker thread
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_DIR = ".tmp"
_T = TypeVar("_T")


def check_sha256(value: str) -> str:
    """Return ``value`` if it is a SHA-256 in 64 lowercase hex digits, else raise BadRequest."""
    if not _SHA_RE.match(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise BadRequest(f"blob name must be a SHA-256 in 64 lowercase hex digits, got {shown!r}",
                         code="bad_blob_name")
    return value


def digest_header_for(sha256_hex: str) -> str:
    """The RFC 9530 ``Content-Digest`` value of a body whose SHA-256 is ``sha256_hex``."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(check_sha256(sha256_hex))).decode() + ":"


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` in a thread; if we are cancelled, still wait for it to finish before re-raising.

    The temp file is then never closed or removed under a write that is still running.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


class _Sink:
    """Hashes chunks and (unless draining) writes them to a temp file. Used from worker threads."""

    def __init__(self, tmp_path: Path | None) -> None:
        self.hash = hashlib.sha256()
        self.tmp_path = tmp_path
        self.fd: int | None = None
        if tmp_path is not None:
            self.fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        if self.fd is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view):]

    def close(self, fsync: bool) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        self.close(fsync=False)
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)


class BlobStore:
    """Blobs on local disk, named by SHA-256; ``max_total_bytes`` None means unbounded."""

    def __init__(self, root: Path, max_blob_bytes: int, max_total_bytes: int | None = None, *,
                 fsync: bool = True) -> None:
        self.root = root
        self.max_blob_bytes = max_blob_bytes
        self.max_total_bytes = max_total_bytes
        self.fsync = fsync  # so an acknowledged blob survives power loss, not only kill -9
        self._tmp = root / _TMP_DIR
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._active_tmp: set[Path] = set()
        self._total: int | None = None  # stored bytes, scanned lazily when a quota is set
        self._pending = 0  # bytes written to temp files of uploads in progress
        self._total_lock = asyncio.Lock()

    # -- lookups (a stat each: cheap enough for the loop) --------------------------------------

    def path(self, sha256_hex: str) -> Path:
        check_sha256(sha256_hex)
        return self.root / sha256_hex[:2] / sha256_hex

    def exists(self, sha256_hex: str) -> bool:
        return self.path(sha256_hex).is_file()

    def touch(self, sha256_hex: str) -> None:
        """Renew the blob's GC grace period (its age counts from now); a blob gone meanwhile is left gone."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(sha256_hex))

    def size(self, sha256_hex: str) -> int:
        try:
            return self.path(sha256_hex).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no blob {sha256_hex}", code="blob_not_found") from None

    # -- upload --------------------------------------------------------------------------------

    async def put(self, sha256_hex: str, stream: aiohttp.StreamReader | AsyncIterator[bytes],
                  expected_size: int | None = None) -> tuple[int, bool]:
        """Store the streamed bytes as blob ``sha256_hex``; return ``(size, created)``.

        Raises BadRequest ``digest_mismatch`` / ``size_mismatch`` (nothing is stored),
        PayloadTooLarge as soon as more than ``max_blob_bytes`` arrive, Unavailable when the store
        is full. An existing blob is not rewritten: the stream is still read and verified (so
        a wrong upload always fails) and the blob's age is refreshed for :meth:`gc`.
        """
        final = self.path(sha256_hex)
        if expected_size is not None and expected_size > self.max_blob_bytes:
            raise self._too_large(expected_size)
        existing = final.is_file()
        if not existing:
            await self._reserve(expected_size or 0, check_only=True)
        tmp = None if existing else self._tmp / f"{sha256_hex}.{secrets.token_hex(8)}.part"
        chunks = stream.iter_chunked(CHUNK_BYTES) if isinstance(stream, aiohttp.StreamReader) else stream
        sink = _Sink(tmp)  # one open(2): cheap
        if tmp is not None:
            self._active_tmp.add(tmp)
        size = 0
        reserved = 0
        try:
            buffer = bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_blob_bytes:
                    raise self._too_large()
                if not buffer and len(chunk) >= CHUNK_BYTES:
                    data = bytes(chunk)
                else:
                    buffer += chunk
                    if len(buffer) < CHUNK_BYTES:
                        continue
                    data, buffer = bytes(buffer), bytearray()
                if tmp is not None:
                    await self._reserve(len(data))
                    reserved += len(data)
                await _in_thread(sink.write, data)
            if buffer:
                if tmp is not None:
                    await self._reserve(len(buffer))
                    reserved += len(buffer)
                await _in_thread(sink.write, bytes(buffer))
            if expected_size is not None and size != expected_size:
                raise BadRequest(f"blob {sha256_hex}: expected {expected_size} bytes, got {size}",
                                 code="size_mismatch")
            actual = sink.hash.hexdigest()
            if actual != sha256_hex:
                raise BadRequest(f"uploaded bytes hash to {actual}, not {sha256_hex}",
                                 code="digest_mismatch", details={"expected": sha256_hex, "actual": actual})
            created = await _in_thread(self._commit, sink, final)
        except BaseException:
            await _in_thread(sink.discard)
            raise
        finally:
            if tmp is not None:
                self._active_tmp.discard(tmp)
            self._pending -= reserved
        if created and self._total is not None:
            self._total += size
        return size, created

    def _commit(self, sink: _Sink, final: Path) -> bool:
        if sink.tmp_path is None:  # verified an existing blob: refresh its age for gc
            try:
                os.utime(final)
            except FileNotFoundError:  # collected while we verified; the bytes were not kept
                raise Conflict(f"blob {final.name} was removed during the upload; upload it again",
                               code="blob_gone") from None
            return False
        sink.close(self.fsync)
        final.parent.mkdir(exist_ok=True)
        created = not final.exists()
        os.replace(sink.tmp_path, final)
        if self.fsync:
            _fsync_dir(final.parent)
        return created

    # -- resumable uploads (hub/uploads.py: the session writes the part file, chunk by chunk) -------

    def part_path(self, sha256_hex: str) -> Path:
        """A new temp file name for a resumable upload of the blob; GC leaves it until :meth:`end_part`."""
        path = self._tmp / f"{check_sha256(sha256_hex)}.{secrets.token_hex(8)}.part"
        self._active_tmp.add(path)
        return path

    def end_part(self, path: Path) -> None:
        self._active_tmp.discard(path)

    async def reserve(self, nbytes: int, check_only: bool = False) -> None:
        """Hold ``nbytes`` of the store's space for an upload in progress (Unavailable when full), or
        only check that they would fit."""
        await self._reserve(nbytes, check_only)

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`reserve` held."""
        if self.max_total_bytes is not None:
            self._pending -= nbytes

    async def commit_part(self, sha256_hex: str, part: Path, size: int) -> bool:
        """Move a verified part file into place as blob ``sha256_hex``; return whether it is new."""
        final = self.path(sha256_hex)

        def commit() -> bool:
            if self.fsync:
                fd = os.open(part, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            final.parent.mkdir(exist_ok=True)
            created = not final.exists()
            os.replace(part, final)
            if self.fsync:
                _fsync_dir(final.parent)
            return created

        created = await _in_thread(commit)
        if created and self._total is not None:
            self._total += size
        return created

    def too_large(self, size: int | None = None) -> PayloadTooLarge:
        return self._too_large(size)

    def _too_large(self, size: int | None = None) -> PayloadTooLarge:
        """``size`` is the declared size; None when the stream ran past the cap."""
        what = f"{size} bytes" if size is not None else f"more than {self.max_blob_bytes} bytes"
        return PayloadTooLarge(f"blob is {what}; this board accepts at most {self.max_blob_bytes} "
                               "bytes per blob", code="blob_too_large",
                               details={"max_blob_bytes": self.max_blob_bytes})

    async def _reserve(self, nbytes: int, check_only: bool = False) -> None:
        if self.max_total_bytes is None:
            return
        total = await self.total_bytes()
        if total + self._pending + nbytes > self.max_total_bytes:
            raise Unavailable(f"blob store is full ({total} of {self.max_total_bytes} bytes used); "
                              "retry after old jobs are removed", code="blob_store_full")
        if not check_only:
            self._pending += nbytes

    async def total_bytes(self) -> int:
        """Bytes in stored blobs (scanned once, then kept up to date by this process)."""
        async with self._total_lock:
            if self._total is None:
                self._total = sum(size for _, size, _ in await asyncio.to_thread(self._scan))
            return self._total

    # -- removal -------------------------------------------------------------------------------

    async def delete(self, sha256_hex: str) -> bool:
        """Remove a blob; return whether it was there."""
        size = await asyncio.to_thread(self._unlink, self.path(sha256_hex))
        if size is not None and self._total is not None:
            self._total -= size
        return size is not None

    async def gc(self, referenced: set[str], grace_s: float) -> list[str]:
        """Delete blobs no job references that are older than ``grace_s``; return their names.

        The grace period protects blobs uploaded for a job that is not submitted yet (a re-upload
        of an existing blob refreshes its age). Stale temp files of dead uploads go too.
        """
        cutoff = time.time() - grace_s
        active = set(self._active_tmp)
        deleted: list[str] = []
        for sha, _, mtime in await asyncio.to_thread(self._scan):
            if sha not in referenced and mtime < cutoff and await self._delete_if_old(sha, cutoff):
                deleted.append(sha)
        await asyncio.to_thread(self._sweep_tmp, active, cutoff)
        return deleted

    async def _delete_if_old(self, sha: str, cutoff: float) -> bool:
        def unlink_if_old() -> int | None:
            path = self.path(sha)
            try:
                if path.stat().st_mtime >= cutoff:  # re-uploaded since the scan
                    return None
            except FileNotFoundError:
                return None
            return self._unlink(path)

        size = await asyncio.to_thread(unlink_if_old)
        if size is not None and self._total is not None:
            self._total -= size
        return size is not None

    @staticmethod
    def _unlink(path: Path) -> int | None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    def _scan(self) -> list[tuple[str, int, float]]:
        found: list[tuple[str, int, float]] = []
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                if _SHA_RE.match(entry.name) and entry.is_file():
                    st = entry.stat()
                    found.append((entry.name, st.st_size, st.st_mtime))
        return found

    def _sweep_tmp(self, active: set[Path], cutoff: float) -> None:
        for entry in os.scandir(self._tmp):
            path = Path(entry.path)
            try:
                if path not in active and entry.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

