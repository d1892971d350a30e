"""Claimed speed checked against observed speed: an agent far slower than it claims is placed by what
the board saw, and flagged.

A capability report is the agent's word; ``min_gflops`` placement and (before hub/trust/) credit
trusted it. The board times each accepted result itself, from the lease to the result's arrival
(never the agent's own ``wall_s``, which it could shorten): that is an upper bound of the run time,
so the observed speed ``kind FLOPs / elapsed`` can only err on the slow side. Only tasks of at least
``_MIN_GFLOP`` count (small tasks are overhead-bound on any machine). Once ``_MIN_SAMPLES`` are known
and even the fastest of the recent ones is below ``speed_claim_ratio`` x the claimed peak, the agent's
claimed GFLOPS are capped at that fastest observed figure for placement, and it is flagged (status
page, /metrics, its standing). Observations live in memory: after a restart they are gathered anew.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from hub.trust.reputation import cost_gflop

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.records import TaskRow

__all__ = ["SpeedCheck"]

_MIN_GFLOP = 1.0
_MIN_SAMPLES = 3
_KEPT = 8


class SpeedCheck:
    def __init__(self, ratio: float, clock: Callable[[], float]) -> None:
        self.ratio, self.clock = ratio, clock
        self._leased_at: dict[str, float] = {}
        self._seen: dict[str, deque[float]] = {}
        self.flags: dict[str, str] = {}               # agent id -> why its claim is not believed
        #: told of each agent whose report this check replaced (the board's fleet: its indexes look again)
        self.on_report: Callable[[AgentState], None] = lambda agent: None

    def leased(self, task_id: str) -> None:
        self._leased_at[task_id] = self.clock()

    def forget(self, task_id: str) -> None:
        self._leased_at.pop(task_id, None)

    def observed(self, agent: AgentState | None, kind: str, task: TaskRow) -> None:
        """An accepted result of ``task`` by ``agent`` arrived now."""
        started = self._leased_at.pop(task.id, None)
        gflop = cost_gflop(kind, task.params)
        if agent is None or started is None or gflop < _MIN_GFLOP:
            return
        elapsed = max(self.clock() - started, 1e-3)
        seen = self._seen.setdefault(agent.row.id, deque(maxlen=_KEPT))
        seen.append(gflop / elapsed)
        self.apply(agent)

    def apply(self, agent: AgentState) -> None:
        """Place the agent by its observed speed if its claim is far above it (also after it re-registers)."""
        seen = self._seen.get(agent.row.id)
        if not seen or len(seen) < _MIN_SAMPLES:
            return
        claimed = max([g.gflops_fp32 for g in agent.caps.gpus] + [agent.caps.cpu_gflops])
        best = max(seen)
        if claimed <= 0 or best >= self.ratio * claimed:
            self.flags.pop(agent.row.id, None)
            return
        self.flags[agent.row.id] = (f"claims {claimed:.0f} GFLOPS, observed at most {best:.1f}: "
                                    "placed by the observed figure")
        caps = agent.caps
        agent.caps = dataclasses.replace(
            caps, cpu_gflops=min(caps.cpu_gflops, best),
            gpus=tuple(dataclasses.replace(g, gflops_fp32=min(g.gflops_fp32, best)) for g in caps.gpus))
        self.on_report(agent)
