"""``PUT|GET|HEAD /v1/blobs/{sha256}``: the blob store over HTTP, streamed both ways.

Signing a streamed upload: the client hashes the file first and signs the request with
``Content-Digest: sha-256=:<base64 of that sha256>:``. The board accepts only a digest equal to
the sha256 in the URL, verifies the signature against it before reading the body, then the store
checks the streamed bytes against the same sha256. GET/HEAD are signed over an empty body.

Access (:mod:`hub.blob_access`): a PUT counts against the key's quota; a GET/HEAD serves a blob only to
a key entitled to it, and anyone else gets the same 404 as for a missing blob. A HEAD by a key entitled
to the blob (what ``panal submit`` sends before skipping an upload) renews its GC grace period.

Handlers raise :class:`~security.errors.PanalError`; :func:`hub.http.error_middleware` renders them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from hub.blob_backend import BlobBackend
from hub.blobs import CHUNK_BYTES, check_sha256, digest_header_for
from hub.http import paced_body, reply
from security.errors import BadRequest, NotFound
from security.httpsig import content_digest

__all__ = ["Authorize", "BlobPolicy", "add_blob_routes"]

#: ``authorize(request, body_digest)`` verifies the request's signature, taking ``body_digest``
#: as the Content-Digest value the body has (it must not read the body), and returns the key id.
Authorize = Callable[[web.Request, str | None], Awaitable[str]]



class BlobPolicy(Protocol):
    """Quotas and reading rights (the board's is :class:`hub.blob_access.BlobAccess`)."""

    async def begin_upload(self, key_id: str, declared: int | None) -> None:
        """Raise if the key may not upload this now; else count the upload in flight."""
    def end_upload(self, key_id: str, declared: int | None) -> None:
        """The upload counted by ``begin_upload`` ended (stored or not)."""
    async def uploaded(self, key_id: str, sha: str, size: int) -> None:
        """The key proved it holds the blob's bytes."""
    async def may_read(self, key_id: str, sha: str) -> bool:
        """Whether the key may read the blob (else it is told the blob is not there)."""


EMPTY_DIGEST = content_digest(b"")
_CACHE_CONTROL = "private, max-age=31536000, immutable"  # a name never changes its content


def add_blob_routes(app: web.Application, store: BlobBackend, authorize: Authorize,
                    access: BlobPolicy | None = None) -> None:
    """Register the blob routes on ``app`` (GET also answers HEAD).

    A PUT answers ``{"sha256", "size", "created"}`` with 201 when stored, 200 when the board
    already had the blob (the bytes were still verified). Without ``access`` every key ``authorize``
    accepts may read every blob, with no quota (a store alone, as the blob tests use it).
    """

    async def put_blob(request: web.Request) -> web.Response:
        sha = check_sha256(request.match_info["sha256"])
        expected = digest_header_for(sha)
        claimed = request.headers.get("content-digest")
        if claimed is not None and claimed.strip() != expected:
            raise BadRequest(f"Content-Digest {claimed.strip()!r} does not match the blob name {sha} "
                             f"(expected {expected!r})", code="digest_mismatch")
        key_id = await authorize(request, expected)
        declared = request.content_length
        body = paced_body(request, CHUNK_BYTES)
        if access is None:
            size, created = await store.put(sha, body, declared)
            return reply(request, {"sha256": sha, "size": size, "created": created}, 201 if created else 200)
        await access.begin_upload(key_id, declared)
        try:
            # put() refuses a declared Content-Length over the cap before reading a byte
            size, created = await store.put(sha, body, declared)
            await access.uploaded(key_id, sha, size)
        finally:
            access.end_upload(key_id, declared)
        return reply(request, {"sha256": sha, "size": size, "created": created}, 201 if created else 200)

    async def get_blob(request: web.Request) -> web.StreamResponse:
        sha = check_sha256(request.match_info["sha256"])
        key_id = await authorize(request, EMPTY_DIGEST)
        path = store.path(sha)
        if not store.exists(sha) or (access is not None and not await access.may_read(key_id, sha)):
            raise NotFound(f"no blob {sha} on this board", code="blob_not_found")
        if request.method == "HEAD":
            store.touch(sha)
        return web.FileResponse(path, headers={
            "Content-Type": "application/octet-stream",
            "Cache-Control": _CACHE_CONTROL,
            "Repr-Digest": digest_header_for(sha),
        })

    app.router.add_put("/v1/blobs/{sha256}", put_blob)
    app.router.add_get("/v1/blobs/{sha256}", get_blob)
