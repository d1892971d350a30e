"""The agents a board knows: what each can do, what it holds now, and who is around."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hub.config import HubConfig
from hub.records import AgentRow
from jobs.requirements import Capabilities
from security.errors import Forbidden
from security.identity import PublicKey

__all__ = ["AgentState", "Fleet", "available_until", "derived"]

T = TypeVar("T")


@dataclass
class AgentState:
    """A registered agent as the board sees it now."""

    row: AgentRow
    key: PublicKey
    caps: Capabilities
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    done: int = 0
    failed: int = 0
    refused: str | None = None          # why a lease gate currently gives it no work
    quiet_until: float = 0.0            # told not to ask again before then (hub/pacing.py): around, not free
    #: facts computed from the current report (``derived``): name -> (the report they were computed from, value)
    memo: dict[str, tuple[Capabilities, Any]] = field(default_factory=dict, repr=False, compare=False)


def derived(agent: AgentState, name: str, compute: Callable[[Capabilities], T]) -> T:
    """``compute(agent.caps)``, computed once per report: policies ask for the same facts of 10,000 agents
    on every pick. A new report (registering again, the speed check) is a new object, so it is recomputed."""
    hit = agent.memo.get(name)
    if hit is not None and hit[0] is agent.caps:
        value: T = hit[1]
        return value
    value = compute(agent.caps)
    agent.memo[name] = (agent.caps, value)
    return value


def _until(caps: Capabilities) -> float | None:
    value = caps.raw.get("available_until")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def available_until(agent: AgentState) -> float | None:
    """The end of the agent's availability window (``available_until`` in its report), if it has one."""
    return derived(agent, "available_until", _until)


class Fleet:
    """The registered agents by id; ``online`` and ``connected`` say who is around now."""

    def __init__(self, config: HubConfig, clock: Callable[[], float]) -> None:
        self.config, self.clock = config, clock
        self._agents: dict[str, AgentState] = {}

    @property
    def agents(self) -> Mapping[str, AgentState]:
        return self._agents

    def load(self, rows: list[AgentRow]) -> None:
        """The agents in the store at start."""
        for row in rows:
            self._agents[row.id] = AgentState(row, PublicKey.parse(row.public_key),
                                              Capabilities.from_dict(row.capabilities), row.last_seen)

    def admission(self, key: PublicKey, name: str, capabilities: Capabilities, owner: str | None = None) -> AgentRow:
        """The row to store for a (re-)registration (the report as the agent sent it; a known agent keeps
        its owner)."""
        now = self.clock()
        known = self._agents.get(key.id)
        return AgentRow(key.id, key.text(), name[:64] or key.id[:12], dict(capabilities.raw),
                        known.row.registered_at if known else now, now, known.row.owner if known else owner)

    def enrol(self, key: PublicKey, row: AgentRow, caps: Capabilities) -> tuple[AgentState, bool]:
        """Register (or update) the agent once its row is stored; whether it is new."""
        known = self._agents.get(key.id)
        if known is not None:
            known.row, known.caps, known.last_seen = row, caps, row.last_seen
            return known, False
        state = self._agents[key.id] = AgentState(row, key, caps, row.last_seen)
        return state, True

    def seen(self, agent_id: str) -> AgentState:
        """The registered agent, noted as seen now."""
        state = self._agents.get(agent_id)
        if state is None:
            raise Forbidden(f"agent {agent_id} is not registered on this board", code="not_registered")
        state.last_seen = self.clock()
        return state

    def _horizon(self, now: float) -> float:
        """Seen since then: an agent in a long poll asks again within ``max_poll_wait_s``."""
        return now - max(2 * self.config.max_poll_wait_s, self.config.lease_ttl_s) - 5

    def online(self) -> list[AgentState]:
        now = self.clock()
        horizon = self._horizon(now)
        back = now - self.config.max_poll_wait_s
        return [a for a in self._agents.values() if a.last_seen >= horizon or a.quiet_until >= back]

    def connected(self, now: float) -> list[AgentState]:
        """Agents that can take work now: seen recently or holding a lease, and not past their window."""
        horizon = self._horizon(now)
        back = now - self.config.max_poll_wait_s   # a paused agent asks again by quiet_until, then long-polls
        out = []
        for agent in self._agents.values():
            until = available_until(agent)
            if (agent.running or agent.last_seen >= horizon or agent.quiet_until >= back) and (
                    until is None or until > now):
                out.append(agent)
        return out
