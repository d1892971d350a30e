"""Wire bodies: msgpack by default, JSON for curl users; one place for content types.

JSON cannot carry bytes, so bytes travel as base64 strings there; signed records accept both.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

from security.errors import BadRequest

__all__ = ["JSON", "MSGPACK", "decode_body", "encode_body"]

MSGPACK = "application/msgpack"
JSON = "application/json"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_body(value: Any, content_type: str = MSGPACK) -> bytes:
    if content_type == JSON:
        return json.dumps(value, default=_json_default, separators=(",", ":")).encode()
    return msgpack.packb(value, use_bin_type=True, default=_json_default)  # type: ignore[no-any-return]


def decode_body(data: bytes, content_type: str) -> Any:
    """Decode a request or response body; raise :class:`BadRequest` naming the format on garbage."""
    if not data:
        return {}
    if content_type.startswith(JSON):
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}", code="malformed_body") from exc
    if content_type.startswith(MSGPACK) or not content_type:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise BadRequest(f"malformed msgpack body: {exc}", code="malformed_body") from exc
    raise BadRequest(f"unsupported Content-Type {content_type!r} (use {MSGPACK} or {JSON})",
                     code="unsupported_media_type")
