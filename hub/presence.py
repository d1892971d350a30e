"""Who is connected now, and which of them have a free slot: kept as agents come and go, not filtered per ask.

``Fleet.connected`` used to test every registered agent on every call; policies that look at other agents
asked it on every pick (10,000 agents: milliseconds before a policy did anything). Here membership follows
the events that change it, and the answer is the same predicate's (:func:`is_connected`):

- an agent joins when it is seen (``Fleet.seen``, ``Fleet.enrol``) or gets a running task (restored leases);
- it leaves when its seen horizon passes (a heap of times to look again, checked lazily on each ask: a time
  found extended by later requests is pushed again), when its availability window ends, or, once the horizon
  has passed, when its last running task ends (its ``running`` set says so: :class:`Running`).

Every change to ``last_seen`` or ``quiet_until`` reaches :meth:`Presence.touch` (``Fleet.seen``, ``Fleet.saw``,
``Fleet.pause``), which schedules the member again from the new values, so a member's scheduled time is never
later than the true one: it is looked at no later than it would drop out (a shorter pause, or one told after
the clock went back, moves it earlier).

The board's clock is wall time, and a wall clock can be set back (an NTP step). The seen and pause times
noted before the step are then in the clock's old time: read as they are, an agent seen just before a step of an
hour, and silent since, would count as connected for that hour (a rival policies count on, never given the
work), and one told to pause 300 s as around an hour after its pause. :meth:`Presence.observe` notices a
``now`` earlier than the last one it saw (every event and ask passes it, before a new time is noted) and
moves those times into the new time by the step it saw, then rebuilds membership from the rule over the whole
fleet: a scan, but only on a rare clock step, never on the pick path of a clock that moves forward. Agents
whose times moved are told to :attr:`Presence.on_moved` (indexes that kept a rival's stay or free time:
hub/dispatch/covers.py, fit_index.py). The step seen is a lower bound of the real one (the clock may have
stepped a while after the last time seen): times stay late by at most that while.

:attr:`version` counts membership changes, and :attr:`log` says which (for indexes that keep counts per job);
:attr:`slots_version` and :meth:`slots_since` do the same for changes to a member's free slots (``best-fit``
keeps sums of them: hub/dispatch/fit_index.py). Both logs are trimmed to :data:`LOG_KEPT` entries.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hub.fleet import AgentState

__all__ = ["Presence", "Running"]

#: membership changes kept for :meth:`Presence.changes_since` (an index further behind counts afresh)
LOG_KEPT = 8192


class Running(set[str]):
    """An agent's running task ids that tell its fleet when they change (leases are granted and vacated
    elsewhere; the presence index must hear of both)."""

    on_change: Callable[[], None] | None = None

    def add(self, element: str) -> None:
        super().add(element)
        if self.on_change is not None:
            self.on_change()

    def discard(self, element: object) -> None:
        super().discard(element)
        if self.on_change is not None:
            self.on_change()

    def remove(self, element: str) -> None:
        super().remove(element)
        if self.on_change is not None:
            self.on_change()

    def clear(self) -> None:
        super().clear()
        if self.on_change is not None:
            self.on_change()


class Presence:
    """The connected agents (``members``) and those of them with a free slot (``idle``)."""

    def __init__(self, seen_s: float, quiet_s: float, until: Callable[[AgentState], float | None],
                 slots: Callable[[AgentState], int], fleet: Mapping[str, AgentState]) -> None:
        #: seen within ``seen_s`` or told to pause until less than ``quiet_s`` ago counts as around
        self.seen_s, self.quiet_s, self._until, self._slots = seen_s, quiet_s, until, slots
        self._fleet = fleet                       # every registered agent: read only when the clock goes back
        self._last_now = -math.inf                # the latest ``now`` seen (an earlier one: the clock stepped back)
        #: told of each agent whose seen or pause time a clock step back moved (the dispatcher notes it)
        self.on_moved: Callable[[AgentState], None] | None = None
        self.members: dict[str, AgentState] = {}
        self.idle: dict[str, AgentState] = {}
        self.version = 0
        self.log: list[tuple[str, bool]] = []   # (agent id, joined) for versions log_base .. version
        self.log_base = 0
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}          # member id -> its live heap entry's time
        self._free: dict[str, int] = {}           # idle member id -> its free slots, as last logged
        self.slots_log: list[str] = []            # ids whose free slots changed: versions slots_base ..
        self.slots_base = 0

    # -- the predicate ----------------------------------------------------------------------------
    def _by_time(self, agent: AgentState, now: float) -> bool:
        """Around without a running task: seen recently, or told to pause and not yet overdue."""
        return agent.last_seen >= now - self.seen_s or agent.quiet_until >= now - self.quiet_s

    def stays_until(self, agent: AgentState, now: float) -> float | None:
        """Until when the agent stays connected without asking again (None: only while it holds a lease, or
        not at all)."""
        if not self._by_time(agent, now):
            return None
        stay = max(agent.last_seen + self.seen_s, agent.quiet_until + self.quiet_s)
        until = self._until(agent)
        return stay if until is None else min(stay, until)

    def is_connected(self, agent: AgentState, now: float) -> bool:
        """Seen recently or holding a lease, and not past its availability window."""
        until = self._until(agent)
        return (bool(agent.running) or self._by_time(agent, now)) and (until is None or until > now)

    # -- events -----------------------------------------------------------------------------------
    def observe(self, now: float) -> None:
        """The clock reads ``now``: if that is earlier than the last time seen, it was set back (see the module's
        docstring). Called before a new seen or pause time is noted, so every time kept is in the old time."""
        if now < self._last_now:
            self._stepped_back(now, self._last_now - now)
        self._last_now = now

    def touch(self, agent: AgentState, now: float) -> None:
        """The agent was seen, registered or given a task: it may have joined; its free slots may differ."""
        self.observe(now)
        member = agent.row.id in self.members
        if not member and self.is_connected(agent, now):
            self._join(agent)
            member = True
        if member:
            self._schedule(agent, now)
            self._note_idle(agent)

    def running_changed(self, agent: AgentState, now: float) -> None:
        self.observe(now)
        if agent.row.id in self.members:
            if not agent.running and not self.is_connected(agent, now):
                self._leave(agent)
                return
            # Looked at again: a member kept only by its leases has no time to look at it (see _schedule), and
            # its seen time may have moved meanwhile (a long poll woken past its horizon); it stays by time now.
            self._schedule(agent, now)
            self._note_idle(agent)
        elif agent.running:
            self.touch(agent, now)

    def refresh(self, now: float) -> None:
        """Drop the members whose time has come (looked at again: a later request may have extended it)."""
        self.observe(now)
        heap, due = self._heap, self._due
        while heap and heap[0][0] <= now:
            at, agent_id = heapq.heappop(heap)
            if due.get(agent_id) != at:
                continue
            del due[agent_id]
            agent = self.members[agent_id]
            if self.is_connected(agent, now):
                self._schedule(agent, now)
            else:
                self._leave(agent)

    def _stepped_back(self, now: float, step: float) -> None:
        """The clock went back by ``step`` (at least): the seen and pause times that still count move back by it
        (older ones count for nothing either way), then membership from the rule over every registered agent,
        and every member's time to look again from its values now."""
        self._heap, self._due = [], {}
        moved = self.on_moved
        for agent_id, agent in self._fleet.items():
            if agent.last_seen >= now - self.seen_s or agent.quiet_until >= now - self.quiet_s:
                agent.last_seen = min(agent.last_seen - step, now)
                agent.quiet_until -= step
                if moved is not None:
                    moved(agent)
            member = agent_id in self.members
            if self.is_connected(agent, now):
                if not member:
                    self._join(agent)
                self._schedule(agent, now)
                self._note_idle(agent)
            elif member:
                self._leave(agent)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _schedule(self, agent: AgentState, now: float) -> None:
        """When to look at the member again: its seen horizon if that is ahead, else its window's end
        (a member held only by running tasks leaves through :meth:`running_changed`)."""
        until = self._until(agent)
        at = math.inf
        if self._by_time(agent, now):   # just past the horizon (never at or before now: the loop must end)
            seen = max(agent.last_seen + self.seen_s, agent.quiet_until + self.quiet_s)
            at = max(math.nextafter(seen, math.inf), math.nextafter(now, math.inf))
        if until is not None:
            at = min(at, until)
        agent_id = agent.row.id
        if at != self._due.get(agent_id) and at != math.inf:
            self._due[agent_id] = at
            heapq.heappush(self._heap, (at, agent_id))
        elif at == math.inf:
            self._due.pop(agent_id, None)
        if len(self._heap) > 4 * len(self._due) + 1024:   # stale entries: rebuild from the live ones
            self._heap = [(t, i) for i, t in self._due.items()]
            heapq.heapify(self._heap)

    def _note_idle(self, agent: AgentState) -> None:
        agent_id = agent.row.id
        free = self._slots(agent) - len(agent.running)
        if free > 0:
            self.idle[agent_id] = agent
            if self._free.get(agent_id) != free:
                self._free[agent_id] = free
                self._slots_logged(agent_id)
        else:
            self.idle.pop(agent_id, None)
            if self._free.pop(agent_id, None) is not None:
                self._slots_logged(agent_id)

    def _join(self, agent: AgentState) -> None:
        self.members[agent.row.id] = agent
        self._logged(agent.row.id, True)

    def _leave(self, agent: AgentState) -> None:
        agent_id = agent.row.id
        del self.members[agent_id]
        self.idle.pop(agent_id, None)
        self._due.pop(agent_id, None)
        if self._free.pop(agent_id, None) is not None:
            self._slots_logged(agent_id)
        self._logged(agent_id, False)

    def _logged(self, agent_id: str, joined: bool) -> None:
        self.version += 1
        self.log.append((agent_id, joined))
        if len(self.log) > 2 * LOG_KEPT:
            drop = len(self.log) - LOG_KEPT
            del self.log[:drop]
            self.log_base += drop

    def _slots_logged(self, agent_id: str) -> None:
        self.slots_log.append(agent_id)
        if len(self.slots_log) > 2 * LOG_KEPT:
            drop = len(self.slots_log) - LOG_KEPT
            del self.slots_log[:drop]
            self.slots_base += drop

    @property
    def slots_version(self) -> int:
        """Counts changes to members' free slots (joining or leaving ``idle`` included)."""
        return self.slots_base + len(self.slots_log)

    def slots_since(self, version: int) -> list[str] | None:
        """Ids of members whose free slots changed after ``version`` (None: no longer kept)."""
        if version < self.slots_base:
            return None
        return self.slots_log[version - self.slots_base:]

    def changes_since(self, version: int) -> list[tuple[str, bool]] | None:
        """Membership changes after ``version`` (None: no longer kept; count afresh)."""
        if version < self.log_base:
            return None
        return self.log[version - self.log_base:]
