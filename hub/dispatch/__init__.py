"""Pluggable pieces around the board's lease and result paths.

A :class:`DispatchPolicy` decides which queued tasks an asking agent gets (one module per policy,
chosen by ``dispatch_policy`` in hub.yaml). :class:`BoardObserver` objects hear about every
settled attempt (results and expired leases) - that is how policies learn observed speeds and how
black-hole detection learns failure rates. A :class:`LeaseGate` may refuse an agent work
(quarantine) with a reason the agent and the status page can show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hub.board import AgentState, Board
    from hub.records import JobRow, TaskRow

__all__ = ["POLICIES", "BoardObserver", "DispatchPolicy", "LeaseGate", "make_policy"]


class DispatchPolicy(Protocol):
    name: str

    def pick(self, board: Board, agent: AgentState, slots: int) -> list[TaskRow]:
        """Remove up to ``slots`` queued tasks the agent can run from the board's queues and return them."""


class BoardObserver(Protocol):
    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        """One attempt ended: a result (ok or failed) or an expired lease (failure "agent_lost")."""


class LeaseGate(Protocol):
    def refuse(self, agent: AgentState) -> str | None:
        """A reason to give this agent no work now, or None."""


def _priority_fifo() -> DispatchPolicy:
    from hub.dispatch.priority_fifo import PriorityFifo

    return PriorityFifo()


def _fair_share() -> DispatchPolicy:
    from hub.dispatch.fair_share import FairShare

    return FairShare()


def _best_fit() -> DispatchPolicy:
    from hub.dispatch.best_fit import BestFit

    return BestFit()


def _fastest() -> DispatchPolicy:
    from hub.dispatch.fastest import Fastest

    return Fastest()


def _adaptive() -> DispatchPolicy:
    from hub.dispatch.adaptive import Adaptive

    return Adaptive()


POLICIES: dict[str, Callable[[], DispatchPolicy]] = {
    "priority-fifo": _priority_fifo,
    "fair-share": _fair_share,
    "best-fit": _best_fit,
    "fastest": _fastest,
    "adaptive": _adaptive,
}


def make_policy(name: str) -> DispatchPolicy:
    factory = POLICIES.get(name)
    if factory is None:
        from security.errors import BadRequest

        raise BadRequest(f"unknown dispatch policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    return factory()
