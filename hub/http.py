"""The board's HTTP helpers, a leaf every route module imports: reply negotiation, errors and bodies.

Replies are JSON (what a person with curl reads) unless the client asks for msgpack: by ``Accept``, or,
when it states no preference, by sending a msgpack body. Request bodies may be either.
Every error leaves as ``{"error": code, "message": ...}`` with the status of its exception class;
nothing else (no traceback) ever reaches a client. Route modules import this module, never the app.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from jobs.wire import JSON, MSGPACK, decode_body, encode_body
from security.errors import BadRequest, PanalError, PayloadTooLarge

__all__ = ["Handler", "error_middleware", "int_query", "read_body", "reply", "reply_type"]

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
        return reply(request, exc.to_body(), exc.status)
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


async def read_body(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body (what the signature covers) and the map it decodes to; a typed record is read from
    that map once the caller is authenticated."""
    data = await request.read()
    value = decode_body(data, request.content_type if request.body_exists else "")
    if not isinstance(value, dict):
        raise BadRequest("request body must be a map", code="malformed_body")
    return data, value


def int_query(request: web.Request, name: str, default: int) -> int:
    """A non-negative whole-number query parameter (a fraction is cut off)."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return max(0, int(float(text)))
    except (ValueError, OverflowError) as exc:  # garbage, nan, inf
        raise BadRequest(f"query parameter {name}: expected a number, got {text!r}") from exc
