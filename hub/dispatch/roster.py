"""The connected agents in order of their fastest device, kept across picks (``fastest``, ``adaptive``).

``fastest`` used to sort every connected agent by speed on every pick. Here the order is kept and follows the
fleet's report and presence logs (a registration, a changed report, a join or a leave moves one agent: a
bisect, not a sort). The key is an
upper bound of the GFLOPS any task's prediction may use on the agent (:func:`top_speed`: fp16 included, the
defaults assumed for a device that reported none), so every agent after a position runs a task no faster than
that position's figure allows (up to its learned correction; see ``Predictor.quick``).

A walk for a task of one kind goes by a finer order (:class:`KindOrder`): the reported top speed over the learned
correction for that kind, so that the agents after a position are predicted no quicker than it, and a walk for an
agent of middling speed stops after the agents predicted quicker, not after every agent whose *reported* speed is
within the lowest correction's reach of it (~1,400 visits at 10,000 agents in ``sim_picks``, ~500 with this).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hub.dispatch.predict import DEFAULT_CPU_GFLOPS, DEFAULT_GPU_GFLOPS
from hub.fleet import derived

if TYPE_CHECKING:
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from jobs.requirements import Capabilities

__all__ = ["BOUND_ROUNDS", "KindOrder", "Roster", "top_speed"]

#: kinds whose order a roster keeps at most (the least recently asked goes)
KINDS_MAX = 16

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
        self._order: list[tuple[float, str]] = []   # (key, agent id), sorted: the fastest first
        self._key: dict[str, float] = {}            # agent id -> its key in the order
        self._read: tuple[int, ...] | None = None   # the logs applied up to here
        self._kinds: dict[str, KindOrder] = {}

    def _key_of(self, agent: AgentState) -> float:
        return -derived(agent, "top_speed", top_speed)

    def _value(self, key: float) -> float:
        """What :meth:`fastest_first` tells of a key: here the top speed."""
        return -key

    def _versions(self, view: DispatchView) -> tuple[int, ...]:
        return view.reports_version(), view.presence_version()

    def _changed(self, view: DispatchView, read: tuple[int, ...]) -> set[str] | None:
        """Agents whose key or membership may have changed since ``read`` (None: too far behind to say)."""
        reports, moves = view.reports_since(read[0]), view.presence_since(read[1])
        if reports is None or moves is None:
            return None
        return {a.row.id for a in reports} | {i for i, _ in moves}

    def update(self, view: DispatchView) -> None:
        """Follow the view's connected agents and their reports (``view.connected_ids`` refreshes presence)."""
        members = view.connected_ids()
        agents = view.agents()
        version = self._versions(view)
        if version == self._read:
            return
        changed = self._changed(view, self._read) if self._read is not None else None
        self._read = version
        if changed is None or len(changed) > len(self._order) // 8 + 64:
            self._key = {a.row.id: self._key_of(a) for a in view.connected()}
            self._order = sorted((k, i) for i, k in self._key.items())
            return
        for agent_id in changed:
            old = self._key.get(agent_id)
            agent = agents.get(agent_id)
            key = self._key_of(agent) if agent is not None and agent_id in members else None
            if old == key:
                continue
            if old is not None:
                del self._order[bisect.bisect_left(self._order, (old, agent_id))]
                del self._key[agent_id]
            if key is not None:
                bisect.insort(self._order, (key, agent_id))
                self._key[agent_id] = key

    def for_kind(self, view: DispatchView, kind: str, predictor: Predictor) -> KindOrder:
        """The connected agents in order of their predicted speed for ``kind`` (:class:`KindOrder`), up to date."""
        order = self._kinds.pop(kind, None)
        if order is None or order.predictor is not predictor:
            order = KindOrder(kind, predictor)
        self._kinds[kind] = order   # (the most recently asked last)
        if len(self._kinds) > KINDS_MAX:
            del self._kinds[next(iter(self._kinds))]
        order.update(view)
        return order

    def fastest_first(self, start: int = 0) -> Iterator[tuple[int, float, str]]:
        """(position, top speed, agent id), fastest first, from ``start`` on (positions hold until the next
        :meth:`update` that changes something)."""
        order, value = self._order, self._value
        return ((i, value(order[i][0]), order[i][1]) for i in range(start, len(order)))

    def most_after(self, start: int, most: Callable[[float], int | None], limit: int) -> int | None:
        """``sum(max(most(value), 0))`` over the agents from position ``start`` on, if it is at most ``limit``
        (else None), where ``most(value)`` (the value :meth:`fastest_first` gives) is an upper bound of the tasks
        the agent finishes first, not rising along the order (None: no bound). The agents counting at least ``k``
        are then a prefix: one bisection per ``k`` (at most :data:`BOUND_ROUNDS`), not a visit per agent."""
        order, value, total, end = self._order, self._value, 0, len(self._order)
        for k in range(1, BOUND_ROUNDS + 1):
            lo = start   # the first position from ``start`` on where ``most`` is below ``k`` (it only falls)
            while lo < end:
                mid = (lo + end) // 2
                bound = most(value(order[mid][0]))
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


class KindOrder(Roster):
    """The connected agents by ``correction / top speed`` for one kind of task, quickest first: every agent after a
    position takes at least ``cost.flops x that key`` to run a task of the kind (a runtime is the cost at some
    device's speed, at most the top speed, times the agent's learned correction for the kind). Besides the
    report and presence logs it follows the predictor's: the agents whose corrections changed."""

    def __init__(self, kind: str, predictor: Predictor) -> None:
        super().__init__()
        self.kind, self.predictor = kind, predictor

    def _key_of(self, agent: AgentState) -> float:
        return self.predictor.factor(agent.row.id, self.kind) / derived(agent, "top_speed", top_speed)

    def _value(self, key: float) -> float:
        return key

    def _versions(self, view: DispatchView) -> tuple[int, ...]:
        return view.reports_version(), view.presence_version(), self.predictor.corrections_version()

    def _changed(self, view: DispatchView, read: tuple[int, ...]) -> set[str] | None:
        changed, corrected = super()._changed(view, read), self.predictor.corrected_since(read[2])
        return None if changed is None or corrected is None else changed | set(corrected)
