"""The one exception tree of panal.

Every error a user or a peer can cause is a :class:`PanalError` leaf. Each leaf maps to one HTTP
status and a stable machine-readable ``code``; the hub turns it into a JSON/msgpack error body and
the CLI prints its ``message`` (never a traceback).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PanalError",
    "PayloadTooLarge",
    "RequestTimeout",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
]


class PanalError(Exception):
    """Base of every panal error; ``status`` is the HTTP status it maps to."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class BadRequest(PanalError):
    """Malformed or invalid input: bad body, bad manifest, bad parameters."""

    status = 400
    code = "bad_request"


class Unauthorized(PanalError):
    """The request's signature is missing, invalid, stale, replayed, or by an unknown key."""

    status = 401
    code = "unauthorized"


class Forbidden(PanalError):
    """A valid key that may not do this (an unauthorised submitter, someone else's lease)."""

    status = 403
    code = "forbidden"


class NotFound(PanalError):
    status = 404
    code = "not_found"


class Conflict(PanalError):
    """The request clashes with the recorded state (lease expired or reassigned, task done)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(PanalError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(PanalError):
    """The request's body did not arrive in time (the board closes the connection)."""

    status = 408
    code = "request_timeout"


class TooManyRequests(PanalError):
    """The caller (a source address) asked too often; ``retry_after_s`` says when to ask again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class Unavailable(PanalError):
    """The board cannot serve this now (draining, shutting down); retry later."""

    status = 503
    code = "unavailable"
