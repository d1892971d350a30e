"""Resumable uploads: a big blob sent as numbered chunks, each verified on arrival, over many requests.

One ``PUT /v1/blobs/{sha256}`` of a multi-GiB file is lost whole when a connection drops. A session
instead takes chunks of ``upload_chunk_bytes`` in order; each chunk request is signed over that chunk's
own sha256 (its ``Content-Digest``), and its bytes are checked against it before they count. A client
whose connection dropped asks again (opening the same blob again returns its session and the next
chunk it needs) and goes on from there; a chunk cut short is cut off the part file. When the last
chunk is in, the whole file's sha256 (hashed chunk by chunk, never re-read) must be the blob's name,
and the file moves into the store like any upload.

Bounds, so that a stranger cannot fill the disk with sessions it never finishes: the blob's size is
declared up front (within ``max_blob_bytes`` and the store's free space) and counted against the key's
quota (hub/blob_access.py) until the session ends; the store's space is held as verified chunks arrive
(as a plain PUT holds it); a key holds at most ``upload_sessions_per_key`` sessions, a network
address ``upload_sessions_per_address`` (keys are free under open registration), the board
``upload_sessions_max``; only a submitter or an agent holding a lease opens one (hub/auth.py
``uploader``); a session that gets no verified chunk for ``upload_session_ttl_s`` (asking
about it does not count) is dropped with its part file. Sessions live in this process: after a hub
restart a client starts its upload again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.blob_backend import BlobBackend
from hub.blobs import CHUNK_BYTES
from hub.config import HubConfig
from security.errors import BadRequest, Conflict, NotFound, PanalError, Unavailable

if TYPE_CHECKING:
    from hub.blob_routes import BlobPolicy

__all__ = ["TooManySessions", "UploadSession", "UploadSessions"]


class TooManySessions(PanalError):
    """A key has as many unfinished upload sessions as it may (429: they end as they finish or expire)."""

    status = 429
    code = "too_many_upload_sessions"


@dataclass
class UploadSession:
    id: str
    key_id: str
    sha256: str
    size: int
    chunk_bytes: int
    part: Path
    received: int = 0
    touched: float = 0.0
    busy: bool = False
    address: str = "?"     # where it was opened from (the TCP peer)
    hash: Any = field(default_factory=hashlib.sha256)

    @property
    def next_chunk(self) -> int:
        return self.received // self.chunk_bytes

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_bytes))

    def chunk_size(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def view(self) -> dict[str, Any]:
        return {"upload_id": self.id, "sha256": self.sha256, "size": self.size, "chunk_bytes": self.chunk_bytes,
                "chunks": self.chunks, "next_chunk": self.next_chunk, "received": self.received}


#: ``begin(key_id, size)`` / ``end(key_id, size)``: the key's quota (hub.blob_access.BlobAccess)
Begin = Callable[[str, int | None], Awaitable[None]]
End = Callable[[str, int | None], None]


class UploadSessions:
    """The board's open upload sessions, by id; bounded per key and in all, expired when idle."""

    def __init__(self, store: BlobBackend, *, chunk_bytes: int, ttl_s: float, per_key: int, most: int,
                 per_address: int | None = None, begin: Begin | None = None, end: End | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.chunk_bytes, self.ttl_s = store, chunk_bytes, ttl_s
        self.per_key, self.most = per_key, most
        self.per_address = per_address if per_address is not None else most
        self._begin, self._end, self._clock = begin, end, clock
        self.sessions: dict[str, UploadSession] = {}

    @classmethod
    def for_board(cls, store: BlobBackend, config: HubConfig, access: BlobPolicy | None) -> UploadSessions:
        """Sessions with the board's settings, counted against its keys' quotas."""
        return cls(store, chunk_bytes=config.upload_chunk_bytes, ttl_s=config.upload_session_ttl_s,
                   per_key=config.upload_sessions_per_key, most=config.upload_sessions_max,
                   per_address=config.upload_sessions_per_address,
                   begin=access.begin_upload if access is not None else None,
                   end=access.end_upload if access is not None else None)

    async def open(self, key_id: str, sha: str, size: int, address: str = "?") -> tuple[UploadSession, bool]:
        """The key's session for blob ``sha`` (the one it already has, to resume; else a new one) and
        whether it is new; ``address`` is the network address asking."""
        self.expire()
        for s in self.sessions.values():
            if s.key_id == key_id and s.sha256 == sha:
                if s.size != size:
                    raise Conflict(f"an upload of {sha} with {s.size} bytes is open; this one says {size}",
                                   code="upload_size_conflict")
                return s, False
        if size > self.store.max_blob_bytes:
            raise self.store.too_large(size)
        mine = sum(1 for s in self.sessions.values() if s.key_id == key_id)
        if mine >= self.per_key:
            raise TooManySessions(f"key {key_id} already has {mine} unfinished uploads (upload_sessions_per_key); "
                                  f"finish them, or they expire after {self.ttl_s:.0f} s idle")
        near = sum(1 for s in self.sessions.values() if s.address == address)
        if near >= self.per_address:
            raise TooManySessions(f"{address} already has {near} unfinished uploads (upload_sessions_per_address); "
                                  f"finish them, or they expire after {self.ttl_s:.0f} s idle",
                                  code="too_many_upload_sessions_from_address")
        if len(self.sessions) >= self.most:
            raise Unavailable("too many uploads in progress on this board; retry later", code="uploads_busy")
        await self.store.reserve(size, check_only=True)
        if self._begin is not None:
            await self._begin(key_id, size)
        session = UploadSession(secrets.token_urlsafe(16), key_id, sha, size, self.chunk_bytes,
                                self.store.part_path(sha), touched=self._clock(), address=address)
        session.part.touch()
        self.sessions[session.id] = session
        return session, True

    def get(self, key_id: str, upload_id: str) -> UploadSession:
        """A key's own session (another key's is as missing as an expired one)."""
        self.expire()
        session = self.sessions.get(upload_id)
        if session is None or session.key_id != key_id:
            raise NotFound(f"no upload {upload_id} (finished, expired after {self.ttl_s:.0f} s idle, or the "
                           "board restarted): open it again", code="upload_not_found")
        return session

    async def put_chunk(self, session: UploadSession, index: int, chunk_sha: str,
                        body: AsyncIterator[bytes], length: int | None) -> tuple[int, bool] | None:
        """Append chunk ``index`` (its bytes must hash to ``chunk_sha``). Returns None while chunks are
        missing, ``(size, created)`` once the blob is stored. A chunk already received is not read again."""
        if index < session.next_chunk:
            return None
        if index != session.next_chunk or index >= session.chunks:
            raise Conflict(f"upload {session.id} needs chunk {session.next_chunk} next, not {index}",
                           code="wrong_chunk", details=session.view())
        want = session.chunk_size(index)
        if length is not None and length != want:
            raise BadRequest(f"chunk {index} must be {want} bytes, not {length}", code="size_mismatch")
        if session.busy:
            raise Conflict(f"chunk {index} of upload {session.id} is already being received", code="chunk_busy")
        session.busy = True   # before any await: a second copy of this chunk must not pass the check meanwhile
        try:
            await self.store.reserve(want)    # disk is held as bytes arrive, as a PUT holds it
        except BaseException:
            session.busy = False
            raise
        kept = False
        try:
            got = await self._receive(session, body, want)
            if got[0] != want or got[1].hexdigest() != chunk_sha:
                await asyncio.to_thread(os.truncate, session.part, session.received)
                if got[0] != want:
                    raise BadRequest(f"chunk {index} must be {want} bytes, got {got[0]}", code="size_mismatch")
                raise BadRequest(f"chunk {index} hashes to {got[1].hexdigest()}, not {chunk_sha}: resend it",
                                 code="digest_mismatch")
            session.hash, session.received = got[2], session.received + want
            session.touched = self._clock()   # only a verified chunk keeps a session alive
            kept = True
        finally:
            session.busy = False
            if not kept:
                self.store.release(want)
        if session.received < session.size:
            return None
        self._close(session, keep_part=True)
        try:
            if session.hash.hexdigest() != session.sha256:
                raise BadRequest(f"the uploaded chunks hash to {session.hash.hexdigest()}, not {session.sha256}",
                                 code="digest_mismatch")
            created = await self.store.commit_part(session.sha256, session.part, session.size)
        finally:
            session.part.unlink(missing_ok=True)
        return session.size, created

    @staticmethod
    async def _receive(session: UploadSession, body: AsyncIterator[bytes], want: int) -> tuple[int, Any, Any]:
        """Write a chunk's bytes after what the part file holds (in a worker thread, 1 MiB at a time),
        hashing them alone and onto the running hash of the whole file; stop past ``want`` bytes."""
        whole, part = session.hash.copy(), hashlib.sha256()
        fd = await asyncio.to_thread(os.open, session.part, os.O_WRONLY)
        got = 0
        buffer = bytearray()

        def write(data: bytes) -> None:
            whole.update(data)
            part.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        try:
            await asyncio.to_thread(os.ftruncate, fd, session.received)
            await asyncio.to_thread(os.lseek, fd, session.received, os.SEEK_SET)
            async for data in body:
                got += len(data)
                if got > want:
                    break
                buffer += data
                if len(buffer) >= CHUNK_BYTES:
                    await asyncio.to_thread(write, bytes(buffer))
                    buffer = bytearray()
            if buffer and got <= want:
                await asyncio.to_thread(write, bytes(buffer))
        finally:
            await asyncio.to_thread(os.close, fd)
        return got, part, whole

    def expire(self) -> list[UploadSession]:
        """Drop every session idle past the ttl (its part file, its quota); return them."""
        now = self._clock()
        gone = [s for s in self.sessions.values() if not s.busy and now - s.touched > self.ttl_s]
        for s in gone:
            self._close(s, keep_part=False)
        return gone

    def _close(self, session: UploadSession, keep_part: bool) -> None:
        self.sessions.pop(session.id, None)
        self.store.release(session.received)
        self.store.end_part(session.part)
        if not keep_part:
            session.part.unlink(missing_ok=True)
        if self._end is not None:
            self._end(session.key_id, session.size)
