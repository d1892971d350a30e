"""Upload a local file to a board's blob store, streamed, signed over its precomputed digest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import yarl

from agent.client.blobcache import hash_file, response_error
from hub.blobs import CHUNK_BYTES, digest_header_for
from security.httpsig import content_digest

__all__ = ["Progress", "Sign", "upload_file"]

#: ``sign(method, path, query, content_digest_header) -> headers`` (see
#: :func:`security.httpsig.sign_request_digest`).
Sign = Callable[[str, str, str, str], dict[str, str]]
#: Called with the number of bytes just sent (or the whole size when the board already has it).
Progress = Callable[[int], None]


async def upload_file(session: aiohttp.ClientSession, base_url: str, path: Path, sign: Sign,
                      progress: Progress | None = None) -> str:
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
