"""The shapes of the daemon's hooks, named once: what LAN mode (or any other owner of boards) plugs in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.client.board import HealthListener
from jobs.requirements import ANY_SUBMITTER, MAX_CODE_KEYS

if TYPE_CHECKING:
    from agent.daemon.daemon import Daemon

__all__ = ["CodeConsent", "HealthListener", "HoldOff", "StartHook", "StatusSource", "SubmitterCheck"]

#: ``trusted(submitter_id)``: whether this agent runs a task from that submitter (a link without one
#: runs every task its board hands out: a WAN hub vouches for its submitters).
SubmitterCheck = Callable[[str], bool]
#: Seconds a board link waits before its next lease request (LAN mode polls boards without work slowly).
HoldOff = Callable[[], float]
#: Awaited once the daemon is up, before it waits for the stop signal (LAN mode starts there).
StartHook = Callable[["Daemon"], Awaitable[None]]
#: Extra fields merged into the daemon's status (LAN mode adds its peers and its board).
StatusSource = Callable[[], dict[str, Any]]


def _nobody() -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class CodeConsent:
    """Whose own code (sandboxed kinds such as ``python``) this agent runs from one board: any
    submitter the board authorises (``panal agent join URL --allow-code``: the board vouches, as a
    BOINC project does), or the keys its owner trusts for code (``panal trust add KEY --code``).
    Both default off. The board is told (``code_from`` in the capability report) so it routes such
    tasks only here; the agent checks again itself, so a board that sends one anyway is refused."""

    any_submitter: bool = False
    keys: Callable[[], frozenset[str]] = field(default=_nobody)

    def accepts(self, submitter: str) -> bool:
        return self.any_submitter or submitter in self.keys()

    def report(self) -> list[str]:
        """The ``code_from`` list for the board (bounded: at most ``MAX_CODE_KEYS`` ids)."""
        return [ANY_SUBMITTER] if self.any_submitter else sorted(self.keys())[:MAX_CODE_KEYS]
