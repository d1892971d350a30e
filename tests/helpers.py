"""Shared test helpers: wait on a condition (never sleep a fixed time hoping it happened) and a fake clock.

A deadline here is a hang detector, not a timing assertion: it is generous (60 s by default) and
multiplied by ``PANAL_TEST_TIME_SCALE`` (e.g. ``3`` on a slow or heavily loaded machine). A test that
needs a deadline passes how long the wait may legitimately take at most, never how long it should.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["AGENT_START_S", "DEFAULT_DEADLINE_S", "FakeClock", "scaled", "wait_for", "wait_for_async"]

T = TypeVar("T")

DEFAULT_DEADLINE_S = 60.0
#: a deadline for waits that include starting `panal agent run`: it imports torch twice (capability probe,
#: warm worker) and measures the CPU, which takes tens of seconds on a loaded machine
AGENT_START_S = 120.0


def _time_scale() -> float:
    text = os.environ.get("PANAL_TEST_TIME_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not 0 < scale < float("inf"):
        raise RuntimeError(f"PANAL_TEST_TIME_SCALE must be a positive number, got {text!r}")
    return scale


TIME_SCALE = _time_scale()


def scaled(seconds: float) -> float:
    """``seconds`` times ``PANAL_TEST_TIME_SCALE``: for deadlines and pytest-timeout marks."""
    return seconds * TIME_SCALE


class _Waiter:
    """One wait: its deadline, the last error the probe raised, and the failure message."""

    def __init__(self, what: str, timeout_s: float, diagnose: Callable[[], str] | None) -> None:
        self.what, self.timeout_s, self.diagnose = what, scaled(timeout_s), diagnose
        self.deadline = time.monotonic() + self.timeout_s
        self.last_error: BaseException | None = None

    def probe(self, probe: Callable[[], T], ignore: tuple[type[BaseException], ...]) -> T | None:
        """One try: the probe's value when truthy, else None; raises the failure once the deadline passed."""
        try:
            value = probe()
        except ignore as exc:
            self.last_error = exc
        else:
            if value:
                return value
        if time.monotonic() > self.deadline:
            raise self.failure()
        return None

    def failure(self) -> AssertionError:
        message = f"timed out after {self.timeout_s:.0f} s waiting for {self.what}"
        if self.last_error is not None:
            message += f" (last error: {type(self.last_error).__name__}: {self.last_error})"
        if self.diagnose is not None:
            message += "\n" + self.diagnose()
        return AssertionError(message)


def wait_for(probe: Callable[[], T], what: str, *, timeout_s: float = DEFAULT_DEADLINE_S, every_s: float = 0.2,
             diagnose: Callable[[], str] | None = None,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``probe`` until it returns something truthy, and return that.

    ``what`` names the awaited condition in the failure message, followed by ``diagnose()`` (e.g. the
    logs of the processes involved). Exceptions in ``ignore`` (e.g. a hub that is down) count as
    "not yet"; the last one is reported if the deadline passes."""
    waiter = _Waiter(what, timeout_s, diagnose)
    while not (value := waiter.probe(probe, ignore)):
        time.sleep(every_s)
    return value


async def wait_for_async(probe: Callable[[], T], what: str, *, timeout_s: float = DEFAULT_DEADLINE_S,
                         every_s: float = 0.02, diagnose: Callable[[], str] | None = None,
                         ignore: tuple[type[BaseException], ...] = ()) -> T:
    """:func:`wait_for` inside the event loop: between probes it yields to the loop instead of blocking it."""
    waiter = _Waiter(what, timeout_s, diagnose)
    while not (value := waiter.probe(probe, ignore)):
        await asyncio.sleep(every_s)
    return value


class FakeClock:
    """A monotonic clock that moves only when the test sets ``now``: pass it as a ``clock=`` callable."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
