"""How long the current request waited for others, for timing what the hub itself takes to serve it.

A lease request's wall time is mostly its long-poll wait when there is no work, and on a busy client it
includes waiting for the client's body (aiohttp clients send the body after the head, from another task):
neither says how fast the hub serves. The metrics middleware opens a tally per request (:func:`tally`);
``hub/http.py`` ``read_raw`` adds the wait for the body and the dispatcher each long-poll wait (:func:`add`);
the middleware records the wall time less the waits as the hub's service time. A context variable carries
the tally: the middleware, the handler and the dispatcher run in the request's one task, and neither the
body reader nor the dispatcher needs a reference to the metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Tally", "add", "tally"]


class Tally:
    """Seconds the request spent waiting (for its body, in long-polls), summed."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_CURRENT: ContextVar[Tally | None] = ContextVar("panal_waits", default=None)


@contextlib.contextmanager
def tally() -> Iterator[Tally]:
    """A fresh tally for the request running in this task, for the duration of the block."""
    current = Tally()
    token = _CURRENT.set(current)
    try:
        yield current
    finally:
        _CURRENT.reset(token)


def add(seconds: float) -> None:
    """A wait of ``seconds`` ended: count it to the running request's tally, if one is open."""
    current = _CURRENT.get()
    if current is not None:
        current.seconds += seconds
