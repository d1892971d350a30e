"""``adaptive``: fair-share between submitters, fastest placement within, flaky agents avoided.

It learns, per agent x kind, throughput (the predictor's observed/predicted ratio) and error
rate (an exponentially weighted failure rate that decays with a half-life, so an agent that was
flaky an hour ago gets to try again). The submitter furthest below its share goes first (as in
``fair-share``); of its jobs, the agent takes only what faster agents could not finish sooner (as
in ``fastest``); and an agent whose recent error rate for a kind is above :data:`MAX_ERROR_RATE`
gets no tasks of that kind while another connected agent could run them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hub.dispatch.covers import Covers
from hub.dispatch.fair_share import Usage, fair_pick, record_usage
from hub.dispatch.fastest import SoonestGate
from hub.dispatch.predict import Predictor
from hub.dispatch.roster import Roster
from hub.dispatch.tally import Tally

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow

__all__ = ["Adaptive", "ErrorRates"]

#: above this recent failure rate an agent is avoided for that kind
MAX_ERROR_RATE = 0.5
#: no verdict on fewer attempts than this
MIN_ATTEMPTS = 3
#: failures that are the job's fault, not the agent's
_NOT_THE_AGENT = frozenset({"invalid_params", "unsupported", "sandbox_violation"})


class ErrorRates:
    """Recent failure rate per (agent, kind): an EWMA whose value halves every ``half_life_s`` idle."""

    def __init__(self, alpha: float = 0.3, half_life_s: float = 1800.0) -> None:
        self.alpha, self.half_life_s = alpha, half_life_s
        self._rates: dict[tuple[str, str], tuple[float, int, float]] = {}   # -> (rate, attempts, as of)
        #: kind -> agents whose rate was above the limit when last recorded: a rate only decays between
        #: records, so no other agent can be above it now (``high`` asks the 10,000 others nothing)
        self._flagged: dict[str, set[str]] = {}

    def rate(self, agent_id: str, kind: str, now: float) -> float:
        rate, attempts, at = self._rates.get((agent_id, kind), (0.0, 0, now))
        if attempts < MIN_ATTEMPTS:
            return 0.0
        return rate * math.pow(0.5, max(now - at, 0.0) / self.half_life_s)

    def record(self, agent_id: str, kind: str, failed: bool, now: float) -> None:
        rate, attempts, at = self._rates.get((agent_id, kind), (0.0, 0, now))
        rate *= math.pow(0.5, max(now - at, 0.0) / self.half_life_s)
        rate = float(failed) if attempts == 0 else (1 - self.alpha) * rate + self.alpha * float(failed)
        self._rates[(agent_id, kind)] = (rate, attempts + 1, now)
        if attempts + 1 >= MIN_ATTEMPTS and rate > MAX_ERROR_RATE:
            self._flagged.setdefault(kind, set()).add(agent_id)
        else:
            self._flagged.get(kind, set()).discard(agent_id)

    def flagged(self, kind: str) -> set[str]:
        """Every agent :meth:`high` may be true of for ``kind`` (those above the limit when last recorded)."""
        return self._flagged.get(kind, set())

    def high(self, agent_id: str, kind: str, now: float) -> bool:
        flagged = self._flagged.get(kind)
        return flagged is not None and agent_id in flagged and self.rate(agent_id, kind, now) > MAX_ERROR_RATE


class Adaptive:
    name = "adaptive"

    def __init__(self) -> None:
        self.predictor = Predictor()
        self.usage = Usage()
        self.errors = ErrorRates()
        self.roster = Roster()
        self.covers = Covers()
        self.tally: Tally | None = Tally(self.predictor, self.errors.flagged)   # (None: covers and walks alone)
        self._now = 0.0

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now = self._now = view.now()

        def avoid(b: AgentState, kind: str) -> bool:
            return self.errors.high(b.row.id, kind, now)

        self.covers.begin(view)
        self.covers.forget(agent.row.id)   # it asks: it may be told to pause, and it may take tasks
        if self.tally is not None:
            self.tally.begin(agent)
        gate = SoonestGate(view, agent, self.predictor, now, self.roster, avoid, self.covers, self.tally)

        def take(job_id: str, limit: int) -> list[TaskRow]:
            if avoid(agent, view.queues.job(job_id).kind) and gate.has_rival(job_id):
                return []
            share = gate.share(job_id, limit)
            return self.predictor.take(view.queues, agent, job_id, share, now) if share else []

        return fair_pick(view, agent, slots, self.usage, now, take, kept_capable=True)

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        now = max(task.updated_at, self._now)
        self.covers.forget(agent_id)   # a new speed correction and error rate
        if self.tally is not None:
            self.tally.touch(agent_id)
        record_usage(self.usage, self.predictor, job, task, metrics, self._now)
        self.errors.record(agent_id, job.kind, not ok and failure not in _NOT_THE_AGENT, now)
        self.predictor.attempt_settled(agent_id, job, task, ok, failure, metrics)
