"""The rows the trust part writes to a board store (and reads back at start).

Kept apart from :mod:`hub.records` (the scheduling rows) so that the store interface names them
without importing the trust logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ban", "CreditGrant", "ReputationRow", "TrustSnapshot", "TrustWrite", "ValidationRow"]


@dataclass
class ReputationRow:
    """One agent's record for one kind: its run of valid results and its totals."""

    agent_id: str
    kind: str
    consecutive_valid: int = 0      # validated results in a row since the last invalid one
    valid: int = 0
    invalid: int = 0
    updated_at: float = 0.0


@dataclass(frozen=True)
class CreditGrant:
    """Credit earned by a holder: ``agent:<id>`` or ``owner:<name>``; added to what it has."""

    holder: str
    credit: float
    results: int = 1


@dataclass
class ValidationRow:
    """How one unit (sweep point) of a job was settled: its state, the quorum and who agreed.

    ``state`` is ``validated`` or ``no_consensus``; ``detail`` keeps the canonical values and, for
    a unit without consensus, each disagreeing answer ({agent, task, values}).
    """

    job_id: str
    unit: int
    state: str
    quorum: int
    canonical_task: str | None
    agents: list[str]
    detail: dict[str, Any] = field(default_factory=dict)
    decided_at: float = 0.0


@dataclass(frozen=True)
class Ban:
    """A quarantine for invalid results, kept across restarts (until is on the board clock)."""

    agent_id: str
    reason: str
    since: float
    until: float


@dataclass
class TrustWrite:
    """What one settled unit changes, written in one transaction."""

    validations: list[ValidationRow] = field(default_factory=list)
    reputation: list[ReputationRow] = field(default_factory=list)
    credit: list[CreditGrant] = field(default_factory=list)
    bans: list[Ban] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.validations or self.reputation or self.credit or self.bans)


@dataclass
class TrustSnapshot:
    """Everything the trust part keeps in the store, as read at start."""

    reputation: list[ReputationRow] = field(default_factory=list)
    credit: dict[str, tuple[float, int]] = field(default_factory=dict)   # holder -> (credit, results)
    bans: list[Ban] = field(default_factory=list)
