"""The agents a board knows: what each can do, what it holds now, and who is around."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hub.config import HubConfig
from hub.presence import Presence, Running
from hub.records import AgentRow
from jobs.requirements import Capabilities
from security.errors import Forbidden
from security.identity import PublicKey

__all__ = ["AgentState", "Fleet", "available_until", "derived", "reported_slots", "slots_of", "stored_capabilities"]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: report fields that only ever grant (protocol features, whose code the agent runs): dropped from a stored report
#: whose value of one a check added since it was stored refuses, so the agent loses what the field would grant
_GRANTING = ("features", "code_from")
#: the kind a stored report past reading is given: no catalog kind has this name, so the agent matches no job until
#: it registers again (an empty report would match every kind)
UNREADABLE_KIND = "(unreadable capability report)"
#: what ``Capabilities.from_dict`` raises on a report it cannot read (``int(inf)``: cores, a GPU's index)
_UNREADABLE = (TypeError, ValueError, AttributeError, OverflowError)


@dataclass
class AgentState:
    """A registered agent as the board sees it now."""

    row: AgentRow
    key: PublicKey
    caps: Capabilities
    last_seen: float = 0.0
    running: set[str] = field(default_factory=Running)   # a Running in a fleet: it tells the fleet of changes
    done: int = 0
    failed: int = 0
    refused: str | None = None          # why a lease gate currently gives it no work
    quiet_until: float = 0.0            # told not to ask again before then (hub/pacing.py): around, not free
    slot_cap: int = 0                   # the board's ``max_slots_per_agent`` (set by its fleet; 0: none)
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


def stored_capabilities(row: AgentRow) -> Capabilities:
    """An agent's report as stored, read again at start.

    Registration refuses a report ``Capabilities.from_dict`` cannot read (a 400), but a report stored by an older
    hub was checked by that hub's rules: a field it kept as unknown (``features`` before unit proofs) may hold
    anything a stranger sent. Such a report must cost its agent what the field grants, never the hub its start (one
    row raising here kept every agent and job from being served)."""
    try:
        return Capabilities.from_dict(row.capabilities)
    except _UNREADABLE as exc:
        problem = str(exc)[:200]
    dropped = [k for k in _GRANTING if k in row.capabilities and not _reads({k: row.capabilities[k]})]
    kept = {k: v for k, v in row.capabilities.items() if k not in dropped}
    if dropped and _reads(kept):
        log.warning("agent %s: its stored capability report does not read (%s): read without %s until it "
                    "registers again", row.id, problem, ", ".join(dropped))
        return Capabilities.from_dict(kept)
    log.warning("agent %s: its stored capability report does not read (%s): sent no work until it registers again",
                row.id, problem)
    return Capabilities.from_dict({"kinds": [UNREADABLE_KIND]})


def _reads(report: dict[str, Any]) -> bool:
    try:
        Capabilities.from_dict(report)
    except _UNREADABLE:
        return False
    return True


def _until(caps: Capabilities) -> float | None:
    """NaN (JSON allows it) is no window: presence read it as "past its window" for a new agent but kept one
    that re-registered with it, while the predictor and best-fit read it as no limit."""
    value = caps.raw.get("available_until")
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def available_until(agent: AgentState) -> float | None:
    """The end of the agent's availability window (``available_until`` in its report), if it has one."""
    return derived(agent, "available_until", _until)


def _reported_slots(caps: Capabilities) -> int | None:
    value = caps.raw.get("slots")   # Infinity or NaN (JSON has both) count as no figure: int() cannot take them
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return max(int(value), 1)
    return None


def reported_slots(agent: AgentState) -> int | None:
    """The slots the agent advertises, if it gives a usable figure."""
    return derived(agent, "slots", _reported_slots)


def slots_of(agent: AgentState) -> int:
    """The slots a policy counts the agent for: its advertised slots within the board's cap, as leasing gives
    them (``Leases.capacity``): one advertising 1,000 slots must not count as free, or as absorbing a queue,
    past the 64 it can be given. One that advertises none counts as one (leasing lets it ask for up to the
    cap, but a policy must not count on slots nobody promised)."""
    reported, cap = reported_slots(agent), agent.slot_cap
    if reported is None:
        return 1
    return min(reported, cap) if cap > 0 else reported


#: report changes kept for :meth:`Fleet.reports_since` (an index further behind rebuilds)
REPORTS_KEPT = 4096


class Fleet:
    """The registered agents by id; ``online`` and ``connected`` say who is around now.

    Indexes over the agents follow two logs instead of scanning: :attr:`presence` (who is connected, who has
    a free slot) and the report log (:meth:`reports_since`: agents whose capability report changed, by
    registering again or by the speed check through :meth:`note_report`; the only ways a report changes)."""

    def __init__(self, config: HubConfig, clock: Callable[[], float]) -> None:
        self.config, self.clock = config, clock
        self._agents: dict[str, AgentState] = {}
        self.presence = Presence(max(2 * config.max_poll_wait_s, config.lease_ttl_s) + 5, config.max_poll_wait_s,
                                 available_until, slots_of, self._agents)
        self._reports: list[AgentState] = []
        self._reports_base = 0

    @property
    def reports_version(self) -> int:
        """Counts registrations and report changes."""
        return self._reports_base + len(self._reports)

    def reports_since(self, version: int) -> list[AgentState] | None:
        """Agents registered or with a new report after ``version`` (None: no longer kept; rebuild)."""
        if version < self._reports_base:
            return None
        return self._reports[version - self._reports_base:]

    def note_report(self, agent: AgentState) -> None:
        """The agent's report changed (a new ``Capabilities`` object): indexes look at it again."""
        self._reports.append(agent)
        if len(self._reports) > 2 * REPORTS_KEPT:
            drop = len(self._reports) - REPORTS_KEPT
            del self._reports[:drop]
            self._reports_base += drop
        self.presence.touch(agent, self.clock())

    def _attach(self, state: AgentState) -> AgentState:
        state.slot_cap = max(self.config.max_slots_per_agent, 1)
        running = state.running if isinstance(state.running, Running) else Running(state.running)
        state.running = running
        presence, clock = self.presence, self.clock
        running.on_change = lambda: presence.running_changed(state, clock())
        self._agents[state.row.id] = state
        self.note_report(state)
        return state

    @property
    def agents(self) -> Mapping[str, AgentState]:
        return self._agents

    def load(self, rows: list[AgentRow]) -> None:
        """The agents in the store at start."""
        now = self.clock()
        for row in rows:   # seen no later than now: a row noted by a clock since set back (a restart, another hub)
            self._attach(AgentState(row, PublicKey.parse(row.public_key), stored_capabilities(row),
                                    min(row.last_seen, now)))

    def admission(self, key: PublicKey, name: str, capabilities: Capabilities, owner: str | None = None) -> AgentRow:
        """The row to store for a (re-)registration (the report as the agent sent it; a known agent keeps
        its owner)."""
        now = self.clock()
        known = self._agents.get(key.id)
        return AgentRow(key.id, key.text(), name[:64] or key.id[:12], dict(capabilities.raw),
                        known.row.registered_at if known else now, now, known.row.owner if known else owner)

    def enrol(self, key: PublicKey, row: AgentRow, caps: Capabilities) -> tuple[AgentState, bool]:
        """Register (or update) the agent once its row is stored; whether it is new."""
        now = self.clock()
        self.presence.observe(now)
        seen = min(row.last_seen, now)   # the row's time was taken before its store write: the clock may have stepped
        known = self._agents.get(key.id)
        if known is not None:
            changed = known.caps is not caps
            known.row, known.caps, known.last_seen = row, caps, seen
            if changed:
                self.note_report(known)
            else:
                self.presence.touch(known, self.clock())
            return known, False
        return self._attach(AgentState(row, key, caps, seen)), True

    def seen(self, agent_id: str) -> AgentState:
        """The registered agent, noted as seen now."""
        state = self._agents.get(agent_id)
        if state is None:
            raise Forbidden(f"agent {agent_id} is not registered on this board", code="not_registered")
        now = self.clock()
        self.presence.observe(now)   # a clock set back moves the kept times first (hub/presence.py)
        state.last_seen = now
        self.presence.touch(state, now)
        return state

    def saw(self, agent: AgentState) -> None:
        """The agent is still asking (a long poll woken): seen now. Through presence, as every change to
        ``last_seen`` must be: after a clock step back "now" is earlier than the seen time it replaces."""
        now = self.clock()
        self.presence.observe(now)
        agent.last_seen = now
        self.presence.touch(agent, now)

    def pause(self, agent: AgentState, seconds: float) -> None:
        """The agent was told to ask again in ``seconds``: it counts as around until that pause is overdue.
        Through presence: a pause shorter than the last one told (jitter, a smaller fleet) ends earlier."""
        now = self.clock()
        self.presence.observe(now)
        agent.quiet_until = now + seconds
        self.presence.touch(agent, now)

    def _horizon(self, now: float) -> float:
        """Seen since then: an agent in a long poll asks again within ``max_poll_wait_s``."""
        return now - max(2 * self.config.max_poll_wait_s, self.config.lease_ttl_s) - 5

    def online(self) -> list[AgentState]:
        now = self.clock()
        self.presence.observe(now)
        horizon = self._horizon(now)
        back = now - self.config.max_poll_wait_s
        return [a for a in self._agents.values() if a.last_seen >= horizon or a.quiet_until >= back]

    def connected(self, now: float) -> list[AgentState]:
        """Agents that can take work now: seen recently or holding a lease, and not past their window (a paused
        agent asks again by ``quiet_until``, then long-polls)."""
        self.presence.refresh(now)
        return list(self.presence.members.values())

    def is_connected(self, agent: AgentState, now: float) -> bool:
        """Whether :meth:`connected` would list the agent (one agent, no list built)."""
        self.presence.observe(now)
        return self.presence.is_connected(agent, now)
