"""An agent's standing with the board, and what a judged answer does to it: reputation per kind, credit,
invalid results counted, and a quarantine once too many of its recent checked results were invalid.

Split from :class:`~hub.trust.trust.Trust`, which decides *whether* results agree (units, quorums,
replication, spot checks); this part decides what that means for the agents that answered. Its effects on
the store (reputation rows, credit grants, bans) go into the :class:`~hub.trust.records.TrustWrite` the
caller collects while judging and writes in :meth:`Trust.flush`.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hub.trust.records import Ban, TrustSnapshot, TrustWrite
from hub.trust.reputation import CreditBook, Reputation, cost_units
from hub.trust.speed import SpeedCheck
from hub.trust.units import Answer, Unit

if TYPE_CHECKING:
    from hub.config import HubConfig
    from hub.quarantine import Quarantine
    from hub.queues import JobQueues

__all__ = ["Standing"]

log = logging.getLogger(__name__)

#: the last judged results of an agent that count towards a quarantine for invalid results
_RECENT = 20


class Standing:
    """Reputation, credit, invalid results and speed flags per agent (``view``: what the status page shows)."""

    def __init__(self, config: HubConfig, clock: Callable[[], float], queues: JobQueues, quarantine: Quarantine,
                 rng: random.Random, stats: dict[str, int]) -> None:
        self.config, self.clock, self.queues, self.quarantine, self.stats = config, clock, queues, quarantine, stats
        self.reputation = Reputation(config.trust_after, rng)
        self.speed = SpeedCheck(config.speed_claim_ratio, clock)
        self.credit = CreditBook()
        self._recent: dict[str, deque[bool]] = {}            # agent -> last judged results (True: invalid)
        self.invalid_counts: dict[str, int] = {}             # agent -> invalid results (all kinds)

    def load(self, snapshot: TrustSnapshot) -> None:
        """The stored reputation, credit and bans (a ban still running is imposed again)."""
        self.reputation.load(snapshot.reputation)
        self.credit.load(snapshot)
        for row in snapshot.reputation:
            self.invalid_counts[row.agent_id] = self.invalid_counts.get(row.agent_id, 0) + row.invalid
        now = self.clock()
        for ban in snapshot.bans:
            if ban.until > now:
                self.quarantine.impose(ban.agent_id, ban.reason, ban.since, ban.until)

    def valid(self, write: TrustWrite, unit: Unit, answer: Answer, *, credit: bool, counts: bool = True) -> None:
        """The answer was found valid: reputation (``counts``: it was checked against another) and credit."""
        now = self.clock()
        if unit.policy.compare.mode == "none":   # nothing was checked: no credit, no reputation from it
            credit = counts = False
        if counts:
            write.reputation.append(self.reputation.valid(answer.agent_id, unit.kind, now))
        self._recent.setdefault(answer.agent_id, deque(maxlen=_RECENT)).append(False)
        if credit:
            task = self.queues.task(answer.task_id)
            units = cost_units(unit.kind, task.params) if task is not None else 0.0
            write.credit += self.credit.grant(answer.agent_id, answer.owner, units)

    def invalid(self, write: TrustWrite, unit: Unit, answer: Answer, why: str) -> None:
        """The answer was found invalid: counted, and the agent quarantined once too many recent ones were."""
        now = self.clock()
        self.stats["invalid"] += 1
        self.invalid_counts[answer.agent_id] = self.invalid_counts.get(answer.agent_id, 0) + 1
        write.reputation.append(self.reputation.invalid(answer.agent_id, unit.kind, now))
        recent = self._recent.setdefault(answer.agent_id, deque(maxlen=_RECENT))
        recent.append(True)
        log.warning("agent %s returned an invalid result for task %s: %s", answer.agent_id, answer.task_id, why)
        limit = self.config.invalid_quarantine_after
        if limit and sum(recent) >= limit:
            reason = (f"quarantined: {sum(recent)} of its last {len(recent)} checked results were invalid "
                      f"(they disagreed with other agents' answers)")
            ban = Ban(answer.agent_id, reason, now, now + self.config.invalid_quarantine_s)
            self.quarantine.impose(ban.agent_id, ban.reason, ban.since, ban.until)
            write.bans.append(ban)
            recent.clear()

    def view(self, agent_id: str) -> dict[str, Any]:
        return {"credit": self.credit.of_agent(agent_id), "invalid_results": self.invalid_counts.get(agent_id, 0),
                "reputation": self.reputation.of_agent(agent_id), "speed_flag": self.speed.flags.get(agent_id)}
