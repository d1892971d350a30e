"""How long the current request has been parked in a long-poll, for timing a lease without its wait.

A lease request's wall time is mostly its long-poll wait when there is no work, so it says nothing about how
fast the hub serves. The metrics middleware opens a tally for a lease request (:func:`tally`) and the
dispatcher adds each wait to it (:func:`add`); the middleware records the wall time less the waits as the
hub's service time. A context variable carries the tally: the middleware, the handler and the dispatcher run
in the request's one task, and the dispatcher needs no reference to the HTTP request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Tally", "add", "tally"]


class Tally:
    """Seconds the request spent parked, summed over its waits."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


_CURRENT: ContextVar[Tally | None] = ContextVar("panal_parked", default=None)


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
