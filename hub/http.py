"""The board's HTTP helpers, a leaf every route module imports: reply negotiation, errors and bodies.

Replies are JSON (what a person with curl reads) unless the client asks for msgpack: by ``Accept``, or,
when it states no preference, by sending a msgpack body. Request bodies may be either.
Every error leaves as ``{"error": code, "message": ...}`` with the status of its exception class
(a 429/503 with ``Retry-After`` when the error says when to come back); nothing else (no traceback)
ever reaches a client. Route modules import this module, never the app.

Bodies: :func:`read_raw` reads the bytes (within the board's ``body_timeout_s``), the caller
authenticates them (hub/auth.py), and only then :func:`decode_map` parses them, with nesting and size
bounds (jobs/wire.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from hub import waits
from jobs.wire import JSON, MSGPACK, decode_body, encode_body
from security.errors import BadRequest, PanalError, PayloadTooLarge, RequestTimeout
from security.httpsig import require_signature_headers

__all__ = ["BODY_TIMEOUT_KEY", "Handler", "decode_map", "error_middleware", "int_query", "paced_body", "read_body",
           "read_raw", "reply", "reply_type"]

#: how long a request's whole body may take to arrive (the app's ``body_timeout_s``)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _reply_type(request: web.Request) -> str:
    """The first of msgpack/JSON that ``Accept`` names; else what the body was sent as; else JSON."""
    accept = request.headers.get("Accept", "")
    named = [t for t in (MSGPACK, JSON) if t in accept]
    if named:
        return min(named, key=accept.index)
    return MSGPACK if request.body_exists and request.content_type == MSGPACK else JSON


def reply_type(request: web.Request) -> str:
    """The content type :func:`reply` would answer ``request`` with (a route serving pre-encoded bytes asks)."""
    return _reply_type(request)


def reply(request: web.Request, value: Any, status: int = 200) -> web.Response:
    """``value`` encoded as the client prefers (see the module's docstring)."""
    content_type = _reply_type(request)
    return web.Response(body=encode_body(value, content_type), status=status, content_type=content_type)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PanalError as exc:
        response = reply(request, exc.to_body(), exc.status)
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        if isinstance(exc, RequestTimeout):
            response.force_close()   # the rest of the body may still be on its way
        return response
    except ConnectionError:  # the client went away mid-request (e.g. an interrupted upload)
        raise
    except web.HTTPRequestEntityTooLarge as exc:
        err = PayloadTooLarge(f"request body too large: {exc.text}", code="body_too_large")
        return reply(request, err.to_body(), err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {"error": exc.reason.lower().replace(" ", "_"), "message": exc.text or exc.reason}
        return reply(request, body, exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return reply(request, {"error": "internal", "message": "internal error (logged on the board)"}, 500)


async def read_raw(request: web.Request) -> bytes:
    """The raw body (what the signature covers), up to ``client_max_size``; a 408 if it takes longer than
    the app's ``body_timeout_s`` (a slow-body sender holds a connection, not the board). Every caller
    authenticates the body, so a request without signature headers is a 401 before a byte of it is read."""
    require_signature_headers(request.headers)
    timeout_s = request.config_dict.get(BODY_TIMEOUT_KEY)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s",
                             code="body_timeout") from exc
    finally:
        waits.add(time.perf_counter() - started)   # the client's pace, not the hub's (hub/metrics.py)


async def paced_body(request: web.Request, chunk_bytes: int) -> AsyncIterator[bytes]:
    """A streamed body (a blob upload: too big for one time limit) in chunks, each of which must arrive
    within the app's ``body_timeout_s``: a stalled upload is a 408, a slow but moving one goes on."""
    timeout_s = request.config_dict.get(BODY_TIMEOUT_KEY)
    chunks = request.content.iter_chunked(chunk_bytes)
    while True:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await anext(chunks, None)
        except TimeoutError as exc:
            raise RequestTimeout(f"the upload stalled: no data for {timeout_s:g} s", code="body_timeout") from exc
        if chunk is None:
            return
        yield chunk


def decode_map(request: web.Request, data: bytes) -> dict[str, Any]:
    """``data`` (an authenticated body) decoded as its Content-Type says, bounded; it must be a map."""
    value = decode_body(data, request.content_type if request.body_exists else "")
    if not isinstance(value, dict):
        raise BadRequest("request body must be a map", code="malformed_body")
    return value


async def read_body(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and the map it decodes to, for a route that needs no signature: an authenticated
    route calls :func:`read_raw`, authenticates, then :func:`decode_map`."""
    data = await read_raw(request)
    return data, decode_map(request, data)


def int_query(request: web.Request, name: str, default: int) -> int:
    """A non-negative whole-number query parameter (a fraction is cut off)."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return max(0, int(float(text)))
    except (ValueError, OverflowError) as exc:  # garbage, nan, inf
        raise BadRequest(f"query parameter {name}: expected a number, got {text!r}") from exc
