"""Black-hole detection: an agent whose recent attempts mostly fail gets no work for a while.

A :class:`Quarantine` is both a :class:`~hub.protocols.BoardObserver` (it hears every settled
attempt, including expired leases) and a :class:`~hub.protocols.LeaseGate` (it refuses work to a
quarantined agent). It keeps the last ``quarantine_window`` attempts of each agent; once at least
``quarantine_min_attempts`` are known and the share of failures reaches ``quarantine_failure_ratio``,
the agent is quarantined for ``quarantine_base_s`` seconds, doubling with each repeat up to
``quarantine_max_s``. Release is automatic: after the cool-down the gate opens again and the agent's
window starts empty, so it gets a fresh chance; a full clean window forgives the earlier strikes.

Not every failure is the agent's fault. Permanent failures (bad parameters, unsupported work) are
the job's, and so is a job that has failed on this agent but never succeeded anywhere: a job whose
every task fails would otherwise quarantine the whole fleet. Such failures count against the agent
only once some other agent has completed a task of that job. Lost leases always count (the agent
vanished). State lives in memory: after a hub restart every agent starts with a clean record.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hub.config import HubConfig
from jobs.errors import FailureClass
from security.errors import BadRequest

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.records import JobRow, TaskRow

__all__ = ["Quarantine"]

log = logging.getLogger(__name__)

#: failures that say nothing about the agent: the work itself can never succeed
_NOT_THE_AGENTS_FAULT = frozenset({FailureClass.INVALID_PARAMS.value, FailureClass.UNSUPPORTED.value})
#: always the agent's fault, whatever the job: it stopped answering while holding a lease
_ALWAYS_THE_AGENTS_FAULT = frozenset({FailureClass.AGENT_LOST.value})
#: how many jobs' success records are kept (the oldest are forgotten first)
_JOBS_KEPT = 10_000


@dataclass(frozen=True)
class _Attempt:
    job_id: str
    ok: bool
    failure: str | None


@dataclass
class _Record:
    """One agent's recent attempts and quarantine history."""

    window: deque[_Attempt]
    strikes: int = 0                 # quarantines in a row without a clean window in between
    until: float = 0.0               # quarantined until this time (board clock)
    since: float = 0.0
    reason: str = ""
    total_quarantines: int = 0
    active: bool = False             # quarantined now (until ``until``)
    on_probation: bool = False       # released, and not yet a full window without relapse
    settled_since_release: int = 0
    failures: dict[str, int] = field(default_factory=dict)   # failure class -> count, in the window


class Quarantine:
    """Black-hole detection for one board: registered on it as both an observer and a gate."""

    def __init__(self, config: HubConfig, clock: Callable[[], float]) -> None:
        if config.quarantine_window < 0 or config.quarantine_min_attempts < 1:
            raise BadRequest("hub settings quarantine_window must be >= 0 and quarantine_min_attempts >= 1")
        if config.quarantine_window and config.quarantine_min_attempts > config.quarantine_window:
            raise BadRequest("hub setting quarantine_min_attempts must not exceed quarantine_window")
        if not 0.0 < config.quarantine_failure_ratio <= 1.0:
            raise BadRequest("hub setting quarantine_failure_ratio must be in (0, 1]")
        if config.quarantine_base_s <= 0 or config.quarantine_max_s < config.quarantine_base_s:
            raise BadRequest("hub settings quarantine_base_s must be > 0 and quarantine_max_s >= quarantine_base_s")
        self.window = config.quarantine_window
        self.min_attempts = config.quarantine_min_attempts
        self.ratio = config.quarantine_failure_ratio
        self.base_s = config.quarantine_base_s
        self.max_s = config.quarantine_max_s
        self.clock = clock
        self.records: dict[str, _Record] = {}
        self._succeeded: OrderedDict[str, set[str]] = OrderedDict()   # job id -> agents that completed a task

    @property
    def enabled(self) -> bool:
        return self.window > 0

    # -- BoardObserver --------------------------------------------------------------------------
    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        if not self.enabled or (not ok and failure in _NOT_THE_AGENTS_FAULT):
            return
        if ok:
            agents = self._succeeded.setdefault(job.id, set())
            self._succeeded.move_to_end(job.id)
            if len(agents) < 3:  # knowing that two others succeeded is enough
                agents.add(agent_id)
            while len(self._succeeded) > _JOBS_KEPT:
                self._succeeded.popitem(last=False)
        record = self.records.get(agent_id)
        if record is None:
            record = self.records[agent_id] = _Record(deque(maxlen=self.window))
        record.window.append(_Attempt(job.id, ok, failure))
        if record.on_probation:
            record.settled_since_release += 1
        self._evaluate(agent_id, record, self.clock())

    # -- LeaseGate ------------------------------------------------------------------------------
    def refuse(self, agent: AgentState) -> str | None:
        record = self.records.get(agent.row.id)
        if record is None:
            return None
        now = self.clock()
        # Failures become the agent's fault once another agent completes the job: look again.
        self._evaluate(agent.row.id, record, now)
        if now < record.until:
            return f"{record.reason}; released in {record.until - now:.0f} s"
        return None

    # -- the rule -------------------------------------------------------------------------------
    def _blamed(self, agent_id: str, attempt: _Attempt) -> bool:
        if attempt.ok:
            return False
        if attempt.failure in _ALWAYS_THE_AGENTS_FAULT:
            return True
        return bool(self._succeeded.get(attempt.job_id, set()) - {agent_id})

    def _evaluate(self, agent_id: str, record: _Record, now: float) -> None:
        if record.active:
            if now < record.until:
                return
            # The cool-down is over: released, with a fresh window.
            record.active, record.on_probation, record.settled_since_release = False, True, 0
            record.window.clear()
            log.info("agent %s released from quarantine (strike %d)", agent_id, record.strikes)
        n = len(record.window)
        blamed = [a for a in record.window if self._blamed(agent_id, a)]
        if n >= self.min_attempts and len(blamed) >= self.ratio * n:
            record.strikes += 1
            record.total_quarantines += 1
            cooldown = min(self.base_s * 2 ** (record.strikes - 1), self.max_s)
            record.since, record.until = now, now + cooldown
            record.active, record.on_probation = True, False
            record.failures = {}
            for attempt in blamed:
                key = attempt.failure or "error"
                record.failures[key] = record.failures.get(key, 0) + 1
            classes = ", ".join(f"{k} x{v}" for k, v in sorted(record.failures.items()))
            record.reason = (f"quarantined: {len(blamed)} of its last {n} attempts failed ({classes}); "
                             f"cool-down {cooldown:.0f} s (strike {record.strikes})")
            record.window.clear()
            log.warning("agent %s %s", agent_id, record.reason)
        elif record.on_probation and record.settled_since_release >= self.window:
            record.strikes = 0  # a full window after release without relapse: forgive the past
            record.on_probation = False

    def impose(self, agent_id: str, reason: str, since: float, until: float) -> None:
        """Quarantine an agent for another reason than failures (invalid results: hub/trust/), until
        ``until``; the trust part stores it, so it outlives a restart."""
        record = self.records.get(agent_id)
        if record is None:
            record = self.records[agent_id] = _Record(deque(maxlen=max(self.window, 1)))
        record.strikes += 1
        record.total_quarantines += 1
        record.since, record.until, record.reason = since, max(until, record.until), reason
        record.active, record.on_probation = True, False
        record.window.clear()
        log.warning("agent %s %s", agent_id, reason)

    # -- views ----------------------------------------------------------------------------------
    def quarantined(self, agent_id: str) -> bool:
        record = self.records.get(agent_id)
        return record is not None and self.clock() < record.until

    def snapshot(self) -> list[dict[str, Any]]:
        """Every agent with a record, quarantined ones first: for the status page and `panal hub agents`."""
        now = self.clock()
        rows: list[dict[str, Any]] = []
        for agent_id, record in self.records.items():
            active = now < record.until
            rows.append({
                "agent": agent_id,
                "quarantined": active,
                "reason": record.reason if active else None,
                "since": record.since if active else None,
                "until": record.until if active else None,
                "remaining_s": round(record.until - now, 1) if active else 0.0,
                "strikes": record.strikes,
                "quarantines": record.total_quarantines,
                "recent_attempts": len(record.window),
                "recent_failures": sum(1 for a in record.window if self._blamed(agent_id, a)),
            })
        rows.sort(key=lambda r: (not r["quarantined"], -int(r["strikes"]), str(r["agent"])))
        return rows
