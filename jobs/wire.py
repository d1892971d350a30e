"""Wire bodies: msgpack by default, JSON for curl users; one place for content types.

JSON cannot carry bytes, so bytes travel as base64 strings there; signed records accept both.

Decoding is bounded: no container may hold more than ``MAX_CONTAINER_LEN`` items and nothing may nest
deeper than ``MAX_DEPTH``. A body over either bound is one 400 (``too_deep`` / ``too_large``), never a
RecursionError (a 200k-deep JSON array once was a 500) or a million empty maps built in memory.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

from security.errors import BadRequest

__all__ = ["JSON", "MAX_CONTAINER_LEN", "MAX_DEPTH", "MSGPACK", "check_shape", "decode_body", "encode_body"]

MSGPACK = "application/msgpack"
JSON = "application/json"
#: the deepest nesting a body may have (a manifest's params are a few levels deep)
MAX_DEPTH = 64
#: the most items one list or map may hold (a job has at most max_tasks_per_job tasks; 10,000 by default)
MAX_CONTAINER_LEN = 100_000


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


def decode_body(data: bytes, content_type: str, *, max_depth: int = MAX_DEPTH,
                max_len: int = MAX_CONTAINER_LEN) -> Any:
    """Decode a request or response body; raise :class:`BadRequest` naming the format on garbage and
    naming the bound when the body nests deeper than ``max_depth`` or a container holds more than
    ``max_len`` items."""
    if not data:
        return {}
    if content_type.startswith(JSON):
        try:
            value = json.loads(data)
        except RecursionError as exc:  # the C scanner recurses; it unwinds cleanly at the interpreter's limit
            raise BadRequest(f"JSON body nests deeper than {max_depth} levels", code="too_deep") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}", code="malformed_body") from exc
    elif content_type.startswith(MSGPACK) or not content_type:
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=max_len,
                                    max_map_len=max_len)
        except msgpack.StackError as exc:
            raise BadRequest(f"msgpack body nests deeper than {max_depth} levels", code="too_deep") from exc
        except ValueError as exc:
            if "exceeds max_" in str(exc):
                raise BadRequest(f"msgpack body has a list or map of more than {max_len} items",
                                 code="too_large") from exc
            raise BadRequest(f"malformed msgpack body: {exc}", code="malformed_body") from exc
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise BadRequest(f"malformed msgpack body: {exc}", code="malformed_body") from exc
    else:
        raise BadRequest(f"unsupported Content-Type {content_type!r} (use {MSGPACK} or {JSON})",
                         code="unsupported_media_type")
    check_shape(value, max_depth, max_len)
    return value


def check_shape(value: Any, max_depth: int = MAX_DEPTH, max_len: int = MAX_CONTAINER_LEN) -> None:
    """Raise :class:`BadRequest` if ``value`` nests deeper than ``max_depth`` or one of its lists or maps
    holds more than ``max_len`` items. Iterative (an explicit stack), so it cannot recurse to death."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > max_depth:
            raise BadRequest(f"body nests deeper than {max_depth} levels", code="too_deep")
        if len(children) > max_len:
            raise BadRequest(f"body has a list or map of more than {max_len} items", code="too_large")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
