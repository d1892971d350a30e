"""Reputation per (agent, kind) and credit per agent and owner, kept in the store.

Adaptive replication (BOINC's, with a steeper fall-off): an agent's work of a kind is always
replicated until it has ``trust_after`` validated results in a row; then it is replicated with
probability ``trust_after / consecutive_valid`` (BOINC uses 1/count, which lets a 10% cheater go
unreplicated for long runs: with the run counting only *validated* results, T/count still falls
to 1% at a run of 1000 while a cheater is caught within its first ~100 tasks; the bench measures
both, ``panal bench integrity``). One invalid result resets the run. A result accepted alone (an
unreplicated trusted agent) does not lengthen the run: it was never checked.

Credit is granted only for results that became the canonical answer of their unit, from the
kind's cost estimate (jobs/kinds: FLOPs, bytes moved, fixed seconds), never from the agent's
claimed speed; each member of the agreeing quorum gets the same. It is kept per agent
(``agent:<id>``) and per owner (``owner:<name>``, where known).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from hub.trust.records import CreditGrant, ReputationRow, TrustSnapshot
from jobs.catalog import get_kind
from security.errors import PanalError

__all__ = ["CreditBook", "Reputation", "cost_gflop", "cost_units"]


def cost_units(kind: str, params: Mapping[str, Any]) -> float:
    """A task's credit: 1 per GFLOP of estimated work, per GB moved, and per second of fixed wall time."""
    try:
        cost = get_kind(kind).estimate(params)
    except (PanalError, KeyError, TypeError, ValueError):
        return 0.0
    return round(cost.flops / 1e9 + cost.bytes / 1e9 + cost.seconds, 6)


def cost_gflop(kind: str, params: Mapping[str, Any]) -> float:
    """A task's estimated floating-point work in GFLOP (0 for kinds without a FLOP estimate)."""
    try:
        return get_kind(kind).estimate(params).flops / 1e9
    except (PanalError, KeyError, TypeError, ValueError):
        return 0.0


class Reputation:
    """Runs of valid results per (agent, kind), in memory and written through with each settled unit."""

    def __init__(self, trust_after: int, rng: random.Random) -> None:
        self.trust_after, self.rng = trust_after, rng
        self.rows: dict[tuple[str, str], ReputationRow] = {}

    def load(self, rows: Iterable[ReputationRow]) -> None:
        for row in rows:
            self.rows[row.agent_id, row.kind] = row

    def row(self, agent_id: str, kind: str) -> ReputationRow:
        row = self.rows.get((agent_id, kind))
        if row is None:
            row = self.rows[agent_id, kind] = ReputationRow(agent_id, kind)
        return row

    def trusted(self, agent_id: str, kind: str) -> bool:
        row = self.rows.get((agent_id, kind))
        return row is not None and row.consecutive_valid >= self.trust_after

    def suspect(self, agent_id: str, kind: str) -> bool:
        """Caught before and not yet back to a full run: its agreement alone validates nothing."""
        row = self.rows.get((agent_id, kind))
        return row is not None and row.invalid > 0 and row.consecutive_valid < self.trust_after

    def replicate(self, agent_id: str, kind: str) -> bool:
        """Whether a unit first leased to this agent runs a second instance in parallel."""
        row = self.rows.get((agent_id, kind))
        if row is None or row.consecutive_valid < self.trust_after:
            return True
        return self.rng.random() < self.trust_after / row.consecutive_valid

    def valid(self, agent_id: str, kind: str, now: float) -> ReputationRow:
        row = self.row(agent_id, kind)
        row.consecutive_valid += 1
        row.valid += 1
        row.updated_at = now
        return row

    def invalid(self, agent_id: str, kind: str, now: float) -> ReputationRow:
        row = self.row(agent_id, kind)
        row.consecutive_valid = 0
        row.invalid += 1
        row.updated_at = now
        return row

    def of_agent(self, agent_id: str) -> dict[str, dict[str, Any]]:
        """kind -> {consecutive_valid, valid, invalid, trusted}, for the views."""
        return {row.kind: {"consecutive_valid": row.consecutive_valid, "valid": row.valid, "invalid": row.invalid,
                           "trusted": row.consecutive_valid >= self.trust_after}
                for (agent, _), row in self.rows.items() if agent == agent_id}

    def invalid_total(self, agent_id: str) -> int:
        return sum(row.invalid for (agent, _), row in self.rows.items() if agent == agent_id)


class CreditBook:
    """Credit totals per holder (``agent:<id>``, ``owner:<name>``) as stored plus what was granted since."""

    def __init__(self) -> None:
        self.totals: dict[str, tuple[float, int]] = {}

    def load(self, snapshot: TrustSnapshot) -> None:
        self.totals = dict(snapshot.credit)

    def grant(self, agent_id: str, owner: str | None, credit: float) -> list[CreditGrant]:
        grants = [CreditGrant(f"agent:{agent_id}", credit)]
        if owner:
            grants.append(CreditGrant(f"owner:{owner}", credit))
        for g in grants:
            total, n = self.totals.get(g.holder, (0.0, 0))
            self.totals[g.holder] = (total + g.credit, n + g.results)
        return grants

    def of_agent(self, agent_id: str) -> float:
        return round(self.totals.get(f"agent:{agent_id}", (0.0, 0))[0], 6)

    def owners(self) -> dict[str, float]:
        return {h.removeprefix("owner:"): round(c, 6) for h, (c, _) in self.totals.items() if h.startswith("owner:")}
