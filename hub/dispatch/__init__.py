"""Dispatch policies: which queued tasks an asking agent gets, one module per policy.

The policy is chosen by ``dispatch_policy`` in hub.yaml; every policy implements
:class:`~hub.protocols.DispatchPolicy` and sees the board only through a
:class:`~hub.protocols.DispatchView`. See POLICIES.md for when to use which.
"""

from __future__ import annotations

from collections.abc import Callable

from hub.protocols import DispatchPolicy

__all__ = ["POLICIES", "make_policy"]


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
