"""Units and their instances: who answered what, and when a quorum of them agrees.

A *unit* is one logical task of a job (a sweep point); its *instances* are task rows that run it
(same params, ``TaskRow.unit``). Keeping the task row as the unit of lease, retry and heartbeat
means queues, leases, retries, the outbox and the agent need no change: only the validator knows
that rows belong together. :meth:`Unit.decide` is the whole rule, pure and synchronous:

- answers are grouped by agreement with each group's first answer (jobs/compare.py);
- a group is the canonical answer once it holds ``needed`` answers from different agents and
  different owners (where owners are known), and, when ``needed`` > 1, not only *suspect* agents
  (an agent with an invalid result and fewer than ``trust_after`` valid ones since): two agents
  caught lying cannot validate each other's answer;
- without such a group, while instances are still out, the unit waits; when all have answered it
  asks for one more instance, up to ``max_instances``, and then fails as ``no_consensus``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hub.trust.policy import ValidationPolicy
from jobs.compare import disagreement

__all__ = ["Answer", "Outcome", "Unit"]


@dataclass(frozen=True)
class Answer:
    """An ok result of one instance, as the validator compares it."""

    task_id: str
    agent_id: str
    owner: str | None
    values: dict[str, Any]
    on_gpu: bool = False
    suspect: bool = False


class Outcome(StrEnum):
    WAIT = "wait"                  # more answers are on their way
    MORE = "more"                  # every instance answered, none agree enough: add an instance
    VALIDATED = "validated"
    NO_CONSENSUS = "no_consensus"


@dataclass
class Unit:
    job_id: str
    idx: int
    kind: str
    policy: ValidationPolicy
    instances: list[str] = field(default_factory=list)      # task ids, oldest first
    needed: int = 1                  # agreeing answers that settle it (1: an unreplicated trusted agent)
    decided: bool = False            # whether replication was decided (adaptive units, at first lease)
    answers: list[Answer] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)               # agents that leased an instance
    owners: set[str] = field(default_factory=set)            # their owners, where known
    state: str = "pending"           # pending | validated | no_consensus
    canonical: Answer | None = None
    closed: set[str] = field(default_factory=set)            # instances that will not answer (failed, cancelled)

    @property
    def key(self) -> tuple[str, int]:
        return self.job_id, self.idx

    @property
    def settled(self) -> bool:
        return self.state != "pending"

    def outstanding(self) -> int:
        answered = {a.task_id for a in self.answers}
        return sum(1 for t in self.instances if t not in answered and t not in self.closed)

    def agrees(self, ref: Answer, other: Answer) -> str | None:
        """Why ``other`` disagrees with ``ref`` (None: it agrees)."""
        return disagreement(self.policy.compare, ref.values, other.values, ref.on_gpu or other.on_gpu)

    def groups(self) -> list[list[Answer]]:
        out: list[list[Answer]] = []
        for answer in self.answers:
            for group in out:
                if self.agrees(group[0], answer) is None:
                    group.append(answer)
                    break
            else:
                out.append([answer])
        return out

    def _quorum(self, group: list[Answer]) -> list[Answer]:
        """The members that count: one per agent and per known owner, in arrival order."""
        agents: set[str] = set()
        owners: set[str] = set()
        counted = []
        for answer in group:
            if answer.agent_id in agents or (answer.owner and answer.owner in owners):
                continue
            agents.add(answer.agent_id)
            if answer.owner:
                owners.add(answer.owner)
            counted.append(answer)
        return counted

    def decide(self) -> tuple[Outcome, list[Answer], str]:
        """The unit's state after its latest answer: (outcome, the agreeing group, why not agreed)."""
        groups = self.groups()
        for group in sorted(groups, key=len, reverse=True):
            counted = self._quorum(group)
            if len(counted) >= self.needed and (self.needed < 2 or not all(a.suspect for a in counted)):
                return Outcome.VALIDATED, group, ""
        why = "; ".join(f"{a.agent_id[:12]}: {self.agrees(groups[0][0], a)}" for g in groups[1:] for a in g[:1])
        if self.outstanding():
            return Outcome.WAIT, [], why
        if len(self.instances) < self.policy.max_instances:
            return Outcome.MORE, [], why
        return Outcome.NO_CONSENSUS, [], why or "too few agreeing answers from different agents"
