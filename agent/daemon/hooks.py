"""The shapes of the daemon's hooks, named once: what LAN mode (or any other owner of boards) plugs in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.client.board import HealthListener

if TYPE_CHECKING:
    from agent.daemon.daemon import Daemon

__all__ = ["HealthListener", "HoldOff", "StartHook", "StatusSource", "SubmitterCheck"]

#: ``trusted(submitter_id)``: whether this agent runs a task from that submitter (a link without one
#: runs every task its board hands out: a WAN hub vouches for its submitters).
SubmitterCheck = Callable[[str], bool]
#: Seconds a board link waits before its next lease request (LAN mode polls boards without work slowly).
HoldOff = Callable[[], float]
#: Awaited once the daemon is up, before it waits for the stop signal (LAN mode starts there).
StartHook = Callable[["Daemon"], Awaitable[None]]
#: Extra fields merged into the daemon's status (LAN mode adds its peers and its board).
StatusSource = Callable[[], dict[str, Any]]
