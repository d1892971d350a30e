"""The part of the agent's status a person reads first: why it is in its state, what it has done,
what it has earned, and how to pause, stop or remove it.

Kept apart from the daemon so the daemon's ``status`` stays a list of raw fields; this adds the
summary over its board links (``panal agent status`` renders both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from agent.client.breaker import BreakerState

__all__ = ["COMMANDS", "HEALTH", "LinkView", "ResultCounts", "summary"]

#: how to control the agent, shown with every status so nobody has to look it up
COMMANDS = {
    "pause": "panal agent pause [--for 2h]",
    "resume": "panal agent resume",
    "stop": "panal agent service stop (or Ctrl-C where `panal agent run` runs)",
    "uninstall": "panal agent service uninstall",
}

#: a board's health in words, from its circuit breaker
HEALTH = {BreakerState.CLOSED.value: "ok", BreakerState.HALF_OPEN.value: "recovering",
          BreakerState.OPEN.value: "unreachable"}


class ResultCounts(Protocol):
    """A board link's results since start (agent/daemon/delivery.py)."""

    done: int
    failed: int


class LinkView(Protocol):
    """What the summary reads of a board link."""

    refused: str | None
    registered: bool
    standing: dict[str, Any]

    @property
    def results(self) -> ResultCounts: ...

    @property
    def breaker_state(self) -> BreakerState: ...


def _credit(standing: dict[str, Any]) -> float:
    value = standing.get("credit")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _why(links: Sequence[LinkView], running: int, paused_reason: str | None) -> str:
    if paused_reason:
        return paused_reason
    if running:
        return f"running {running} task(s)"
    if not links:
        return "no board yet: join one with `panal agent join JOIN_URL` (LAN mode adds its peers as they appear)"
    reachable = [link for link in links if link.breaker_state is not BreakerState.OPEN]
    if not reachable:
        return "no board is reachable; retrying"
    if all(link.refused for link in reachable):
        return "every board refuses work to this agent: " + "; ".join(str(link.refused) for link in reachable)
    if not any(link.registered for link in reachable):
        return "registering with the board(s)"
    return f"waiting for work from {len(reachable)} board(s)"


def summary(links: Sequence[LinkView], *, running: int, paused_reason: str | None, name: str) -> dict[str, Any]:
    """Fields merged into the daemon's status: ``why``, totals since start, credit (as the boards
    reported it, summed), and the control commands."""
    return {
        "name": name,
        "why": _why(links, running, paused_reason),
        "done": sum(link.results.done for link in links),
        "failed": sum(link.results.failed for link in links),
        "credit": round(sum(_credit(link.standing) for link in links), 3),
        "commands": dict(COMMANDS),
    }
