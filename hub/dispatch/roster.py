"""The connected agents in order of their fastest device, kept across picks (``fastest``, ``adaptive``).

``fastest`` used to sort every connected agent by speed on every pick. Here the order is kept and follows the
fleet's report and presence logs (a registration, a changed report, a join or a leave moves one agent: a
bisect, not a sort). The key is an
upper bound of the GFLOPS any task's prediction may use on the agent (:func:`top_speed`: fp16 included, the
defaults assumed for a device that reported none), so every agent after a position runs a task no faster than
that position's figure allows (up to its learned correction; see ``Predictor.quick``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hub.dispatch.predict import DEFAULT_CPU_GFLOPS, DEFAULT_GPU_GFLOPS
from hub.fleet import derived

if TYPE_CHECKING:
    from hub.protocols import DispatchView
    from jobs.requirements import Capabilities

__all__ = ["BOUND_ROUNDS", "Roster", "top_speed"]

#: task counts a :meth:`Roster.most_after` bound looks at (one bisection each) before it gives up
BOUND_ROUNDS = 16


def top_speed(caps: Capabilities) -> float:
    """The most GFLOPS ``predict.base_seconds`` may credit the agent with, whatever the task."""
    best = caps.cpu_gflops if caps.cpu_gflops > 0 else DEFAULT_CPU_GFLOPS
    for gpu in caps.gpus:
        best = max(best, gpu.gflops_fp32 if gpu.gflops_fp32 > 0 else DEFAULT_GPU_GFLOPS, gpu.gflops_fp16,
                   DEFAULT_GPU_GFLOPS if max(gpu.gflops_fp32, gpu.gflops_fp16) <= 0 else 0.0)
    return best


class Roster:
    """Connected agent ids by :func:`top_speed`, fastest first.

    Only connected agents: every key ever registered stays in the fleet (a hub's history, a stranger's keys
    under open registration), and a walk through the gone ones cost a pick O(registered), not O(connected).
    The order follows both logs: the report log (a new key) and the presence log (joins and leaves)."""

    def __init__(self) -> None:
        self._order: list[tuple[float, str]] = []   # (-top speed, agent id), sorted
        self._key: dict[str, float] = {}            # agent id -> its -top speed in the order
        self._read: tuple[int, int] | None = None   # (report log, presence log) applied up to here

    def update(self, view: DispatchView) -> None:
        """Follow the view's connected agents and their reports (``view.connected_ids`` refreshes presence)."""
        members = view.connected_ids()
        agents = view.agents()
        version = (view.reports_version(), view.presence_version())
        if version == self._read:
            return
        reports = view.reports_since(self._read[0]) if self._read is not None else None
        moves = view.presence_since(self._read[1]) if self._read is not None else None
        self._read = version
        if reports is None or moves is None or len(reports) + len(moves) > len(self._order) // 8 + 64:
            self._key = {a.row.id: -derived(a, "top_speed", top_speed) for a in view.connected()}
            self._order = sorted((k, i) for i, k in self._key.items())
            return
        for agent_id in {a.row.id for a in reports} | {i for i, _ in moves}:
            old = self._key.get(agent_id)
            agent = agents.get(agent_id)
            key = -derived(agent, "top_speed", top_speed) if agent is not None and agent_id in members else None
            if old == key:
                continue
            if old is not None:
                del self._order[bisect.bisect_left(self._order, (old, agent_id))]
                del self._key[agent_id]
            if key is not None:
                bisect.insort(self._order, (key, agent_id))
                self._key[agent_id] = key

    def fastest_first(self, start: int = 0) -> Iterator[tuple[int, float, str]]:
        """(position, top speed, agent id), fastest first, from ``start`` on (positions hold until the next
        :meth:`update` that changes something)."""
        order = self._order
        return ((i, -order[i][0], order[i][1]) for i in range(start, len(order)))

    def most_after(self, start: int, most: Callable[[float], int | None], limit: int) -> int | None:
        """``sum(max(most(speed), 0))`` over the agents from position ``start`` on, if it is at most ``limit``
        (else None), where ``most(speed)`` is an upper bound of the tasks an agent of that top speed finishes
        first, non-decreasing in the speed (None: no bound). The order is by speed, so the agents counting at
        least ``k`` are a prefix: one bisection per ``k`` (at most :data:`BOUND_ROUNDS`), not a visit per agent."""
        order, total, end = self._order, 0, len(self._order)
        for k in range(1, BOUND_ROUNDS + 1):
            lo = start   # the first position from ``start`` on where ``most`` is below ``k`` (it only falls)
            while lo < end:
                mid = (lo + end) // 2
                bound = most(-order[mid][0])
                if bound is None or bound >= k:
                    lo = mid + 1
                else:
                    end = mid
            total += end - start
            if end == start:
                return total
            if total > limit:
                return None
        return None

    def __len__(self) -> int:
        return len(self._order)
