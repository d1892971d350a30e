"""``POST /v1/uploads``, ``GET /v1/uploads/{id}``, ``PUT /v1/uploads/{id}/{index}``: resumable uploads over HTTP.

The protocol (hub/uploads.py holds the sessions): ``POST /v1/uploads?sha256=S&size=N`` (signed over an
empty body; the query is signed) opens a session, or returns the key's open one for that blob, with the
chunk size and the next chunk the board needs. Each ``PUT /v1/uploads/{id}/{index}`` carries one chunk,
signed with ``Content-Digest: sha-256=:<base64 of the chunk's sha256>:``; the signature is verified
before the body is read, the bytes against that digest as they arrive. The reply says what comes next,
and after the last chunk it is the same ``{"sha256", "size", "created"}`` as a ``PUT /v1/blobs/{sha256}``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator

from aiohttp import web

from hub.background import cancel_all, run_every
from hub.blob_routes import EMPTY_DIGEST, Authorize, BlobPolicy
from hub.blobs import CHUNK_BYTES, check_sha256
from hub.http import paced_body, reply
from hub.uploads import UploadSessions
from security.errors import BadRequest

__all__ = ["add_upload_routes"]

_DIGEST = re.compile(r"^sha-256=:([A-Za-z0-9+/=]{44}):$")


def chunk_sha(header: str | None) -> str:
    """The sha256 hex a chunk's ``Content-Digest`` names (required: it is what the request is signed over)."""
    found = _DIGEST.match((header or "").strip())
    try:
        raw = base64.b64decode(found.group(1), validate=True) if found else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise BadRequest("a chunk needs Content-Digest: sha-256=:<base64 of its sha256>:", code="bad_content_digest")
    return raw.hex()


def add_upload_routes(app: web.Application, sessions: UploadSessions, authorize: Authorize,
                      access: BlobPolicy | None = None, may_open: Authorize | None = None) -> None:
    """Register the resumable upload routes (the blobs they make are stored as ``PUT /v1/blobs`` does).
    ``may_open`` (default ``authorize``) says who may open a session."""
    opener = may_open or authorize

    async def open_upload(request: web.Request) -> web.Response:
        sha = check_sha256(request.query.get("sha256", ""))
        text = request.query.get("size", "")
        if not (text.isascii() and text.isdigit()) or len(text) > 20:   # int_query would make "-5" a 0
            raise BadRequest(f"give the blob's size in bytes as a whole number: ?size=N, not {text[:40]!r}",
                             code="bad_size")
        size = int(text)
        key_id = await opener(request, EMPTY_DIGEST)
        session, new = await sessions.open(key_id, sha, size, request.remote or "?")
        return reply(request, session.view(), 201 if new else 200)

    async def show_upload(request: web.Request) -> web.Response:
        key_id = await authorize(request, EMPTY_DIGEST)
        return reply(request, sessions.get(key_id, request.match_info["upload_id"]).view())

    async def put_chunk(request: web.Request) -> web.Response:
        claimed = request.headers.get("content-digest")
        digest = chunk_sha(claimed)
        key_id = await authorize(request, (claimed or "").strip())
        session = sessions.get(key_id, request.match_info["upload_id"])
        text = request.match_info["index"]
        if not (text.isascii() and text.isdigit()) or len(text) > 12:   # int() takes "١", " 1", "1_0"
            raise BadRequest(f"a chunk index is a whole number, not {text[:40]!r}", code="bad_chunk_index")
        index = int(text)
        done = await sessions.put_chunk(session, index, digest, paced_body(request, CHUNK_BYTES),
                                        request.content_length)
        if done is None:
            return reply(request, session.view())
        size, created = done
        if access is not None:
            await access.uploaded(key_id, session.sha256, size)
        return reply(request, {"sha256": session.sha256, "size": size, "created": created}, 201 if created else 200)

    async def sweep(app: web.Application) -> AsyncIterator[None]:
        """Idle sessions end on time even when no upload request comes to notice them."""
        async def expire() -> None:
            sessions.expire()

        task = run_every(max(1.0, min(sessions.ttl_s / 4, 60.0)), expire, "upload session expiry")
        yield
        await cancel_all([task])

    app.cleanup_ctx.append(sweep)
    app.router.add_post("/v1/uploads", open_upload)
    app.router.add_get("/v1/uploads/{upload_id}", show_upload)
    app.router.add_put("/v1/uploads/{upload_id}/{index}", put_chunk)
