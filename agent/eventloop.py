"""Which event loop panal's processes run on: asyncio's own, or uvloop where a user asks for it.

``PANAL_EVENT_LOOP=uvloop`` (with the ``uvloop`` extra: ``pip install 'panal[uvloop]'``) runs the hub, the agent
and the CLI on uvloop, a libuv loop written in Cython: less Python per socket event and per callback. It is opt-in
because panal must not need it (it has no Windows build, and a loop is a large piece of machinery to swap under a
running board); everything is tested on asyncio's loop, and the hub's own TLS and connection guard
(hub/connections.py) work the same on both (tests/test_uvloop.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from security.errors import BadRequest

__all__ = ["EVENT_LOOP_ENV", "loop_factory", "run"]

T = TypeVar("T")
EVENT_LOOP_ENV = "PANAL_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop ``PANAL_EVENT_LOOP`` names (None: asyncio's default); a clear error for an unknown name or a
    missing uvloop."""
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if choice in ("", "asyncio"):
        return None
    if choice != "uvloop":
        raise BadRequest(f"{EVENT_LOOP_ENV}={choice!r}: expected asyncio or uvloop", code="bad_event_loop")
    try:
        import uvloop
    except ImportError as exc:
        raise BadRequest(f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed: pip install 'panal[uvloop]' "
                         "(or unset it to use asyncio's loop)", code="bad_event_loop") from exc
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` on the loop ``PANAL_EVENT_LOOP`` names."""
    try:
        factory = loop_factory()
    except BadRequest:
        coro.close()   # never awaited: no "coroutine was never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
