"""Upload a local file to a board's blob store, streamed, signed over its precomputed digest.

A file of ``RESUMABLE_FROM`` bytes or more goes up resumably (hub/uploads.py): in the board's chunk size,
each chunk signed over its own digest; when a connection drops, the board is asked which chunk it needs
next and the upload goes on from there (a few tries, backing off). A board without resumable uploads
(404 on ``POST /v1/uploads``) gets one streamed PUT, as before. Either way the board's per-file cap
(``max_blob_bytes``, in ``GET /v1/limits``) refuses a file too big before its bytes are sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import yarl

from agent.client.blobcache import hash_file, response_error
from hub.blobs import CHUNK_BYTES, digest_header_for
from security.httpsig import content_digest

__all__ = ["RESUMABLE_FROM", "Progress", "Sign", "upload_file"]

RESUMABLE_FROM = 64 * 2**20   # smaller files go up in one PUT: one request, and little to lose when it fails
_TRIES = 6
_ASK_AGAIN = {"upload_not_found", "wrong_chunk", "chunk_busy"}

#: ``sign(method, path, query, content_digest_header) -> headers`` (see
#: :func:`security.httpsig.sign_request_digest`).
Sign = Callable[[str, str, str, str], dict[str, str]]
#: Called with the number of bytes just sent (or the whole size when the board already has it).
Progress = Callable[[int], None]


async def upload_file(session: aiohttp.ClientSession, base_url: str, path: Path, sign: Sign,
                      progress: Progress | None = None, *, resumable_from: int = RESUMABLE_FROM) -> str:
    """Make sure the board at ``base_url`` has ``path`` as a blob; return its sha256.

    The file is hashed first (streamed), then a signed HEAD skips the upload if the board
    already has it; otherwise it is PUT in chunks with the digest signed up front.
    """
    sha, size = await asyncio.to_thread(hash_file, path)
    url = yarl.URL(base_url.rstrip("/") + f"/v1/blobs/{sha}")
    async with session.head(url, headers=sign("HEAD", url.path, url.query_string,
                                              content_digest(b""))) as resp:
        if resp.status == 200 and resp.content_length == size:
            if progress is not None:
                progress(size)
            return sha
        if resp.status not in (200, 404):
            raise await response_error(resp)
    if size >= resumable_from and await _upload_resumable(session, base_url, path, sha, size, sign, progress):
        return sha

    async def chunks() -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(path.open, "rb")
        try:
            sent = 0
            while sent < size:
                chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, size - sent))
                if not chunk:
                    break  # shrank since hashed: the board answers size_mismatch
                sent += len(chunk)
                yield chunk
                if progress is not None:
                    progress(len(chunk))
        finally:
            f.close()

    headers = sign("PUT", url.path, url.query_string, digest_header_for(sha))
    headers.update({"Content-Length": str(size), "Content-Type": "application/octet-stream"})
    async with session.put(url, data=chunks(), headers=headers) as resp:
        if resp.status not in (200, 201):
            raise await response_error(resp)
    return sha


async def _upload_resumable(session: aiohttp.ClientSession, base_url: str, path: Path, sha: str, size: int,
                            sign: Sign, progress: Progress | None) -> bool:
    """Upload ``path`` chunk by chunk; False when the board has no resumable uploads (use a PUT)."""
    base = base_url.rstrip("/")
    sent_before = 0   # what progress was told: a resumed try reports only chunks it sends
    for attempt in range(_TRIES):
        try:
            opened = yarl.URL(base + "/v1/uploads").with_query(sha256=sha, size=str(size))
            headers = sign("POST", opened.path, opened.query_string, content_digest(b""))
            async with session.post(opened, headers={**headers, "Accept": "application/json"}) as resp:
                if resp.status in (404, 405):
                    return False
                if resp.status not in (200, 201):
                    raise await response_error(resp)
                state = await resp.json()
            chunk_bytes, upload_id = int(state["chunk_bytes"]), str(state["upload_id"])
            done = int(state["next_chunk"]) * chunk_bytes
            if progress is not None and done > sent_before:
                progress(done - sent_before)
                sent_before = done
            with path.open("rb") as f:
                for index in range(int(state["next_chunk"]), int(state["chunks"])):
                    f.seek(index * chunk_bytes)
                    data = await asyncio.to_thread(f.read, min(chunk_bytes, size - index * chunk_bytes))
                    url = yarl.URL(base + f"/v1/uploads/{upload_id}/{index}")
                    digest = await asyncio.to_thread(content_digest, data)   # 16 MiB: off the event loop
                    headers = sign("PUT", url.path, url.query_string, digest)
                    headers.update({"Content-Type": "application/octet-stream", "Accept": "application/json"})
                    async with session.put(url, data=data, headers=headers) as resp:
                        if resp.status not in (200, 201):
                            raise await response_error(resp)
                    if progress is not None:
                        progress(len(data))
                        sent_before += len(data)
            return True
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError):
            if attempt == _TRIES - 1:
                raise
            await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
    return True
