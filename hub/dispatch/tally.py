"""``fastest``'s rival count from sorted runtimes: a few bisections, whatever the asker's speed.

An asker needing ``h`` seconds for a task is told to take none while the other capable connected agents finish
the queue first; an idle rival with runtime ``r`` finishes ``ceil(h / r - 1e-9) - 1`` tasks before it
(``SoonestGate._ahead``). That is at least ``k`` exactly when ``r < h / (k + 1e-9)``, so the idle rivals together
finish ``sum over k of #{r < h / (k + 1e-9)}``: with their runtimes sorted, one bisection per ``k``. The walk,
covers and repairs (``fastest.py``, ``covers.py``) visit rivals one by one instead; their slowest picks were an
asker nearly as quick as the rivals whose kept covers fell short, and ~500 visits to prove the answer again.

Runtimes differ per task shape, but for most work they are one number per agent times one per task: a task
costing only FLOPs (or only bytes, or only fixed seconds) runs ``cost x key`` on an agent, where ``key`` is its
seconds per unit on the device it would use (for the job's requirements and precision) times its learned
correction for the kind. So one :class:`Members` per (requirements, kind, precision, unit) keeps every capable
connected agent's key, sorted, and serves every shape of that unit (a task costing both FLOPs and bytes uses
the FLOP keys when its bytes never set any member's runtime, and the other way round).

The count is computed twice, as bounds: a lower one with ``h`` shortened and an upper one with ``h`` lengthened by
the rounding the walk's arithmetic may add (the epoch's ulp, a relative 1e-12), and a deadline cuts the keys the
same way. When the lower bound reaches the queue the answer is "none"; when the upper bound leaves ``need`` it is
``need``; when they agree the count is exact; otherwise (a runtime within rounding of a task boundary) the walk
answers. Agents whose part is not this formula are judged one by one by the walk's own rule (``_ahead``) and
their keys taken out of the sums: the asker, agents ``adaptive`` may avoid, agents whose window ends within the
asker's task, agents busy or paused until before the asker would finish (a few; the others finish nothing first),
and agents with keys outside the range where products keep their precision. With more of them than
:data:`LOOK`, busy ones count in the upper bound as if idle, and the rest go to the walk.

Members follow the board's logs between picks: registrations and changed reports, joins and leaves, free-slot
changes, standing noted outside a pick (a refusal, a pause, a task leaving a full agent), learned corrections, the
asker itself (its own pick ends refusals) and settled attempts; a busy member becomes idle when its predicted
free time passes. The clock going back, or a log no longer kept, starts them over.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Container, Hashable
from typing import TYPE_CHECKING

from hub.dispatch.members import KEY_MAX, Members, entry, listed, sums
from hub.dispatch.predict import HALF

if TYPE_CHECKING:
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow
    from jobs.kinds.base import Cost
    from jobs.requirements import Requirements

__all__ = ["LOOK", "Tally", "bounds"]

#: relative slack of both bounds (each rounding in the walk's arithmetic is ~1e-16 of its value)
EPS = 1e-12
#: ulps of the epoch both bounds allow for the asker's end (``now + mine`` rounds to the epoch's precision)
ULPS = 2.0
#: agents judged one by one per question at most before the question goes to the walk
LOOK = 64
#: member lists kept at most (the least recently asked goes)
LISTS_MAX = 16
#: a window ending this long after the asker would finish cannot cut an idle rival's part (it ends sooner)
WINDOW_SLACK_S = 1.0


class Tally:
    """The member lists of one ``fastest`` or ``adaptive`` policy, and the logs they follow."""

    def __init__(self, predictor: Predictor, flagged: Callable[[str], Container[str]] | None = None) -> None:
        self.predictor = predictor
        #: per kind, every agent ``adaptive`` may avoid (a superset: those above its error limit when last recorded;
        #: the set changes only as attempts settle, and each settled attempt's agent is judged again)
        self.flagged = flagged
        self._lists: dict[tuple[Requirements, str, bool, str], Members] = {}
        self._read: tuple[int, int, int, int] | None = None   # presence, slots, noted, corrections
        self._dirty: set[str] = set()
        self._now = -math.inf
        self._pending: AgentState | None = None   # the asker of a pick whose logs are not applied yet
        self._asker: str | None = None             # the last pick's asker (judged again at the next pick)
        self._by_job: dict[tuple[str, bool, str], Members] = {}   # (job id, precision, unit) -> its list
        self._uses = 0                                                # questions asked so far
        self._picks = 0                                               # picks begun so far
        self._units: dict[Hashable, tuple[str, float, float, bool] | None] = {}   # task shape -> :func:`_unit`
        self._built = -1                                              # the pick that last built a list

    def touch(self, agent_id: str) -> None:
        """Something happened to the agent (a settled attempt): judge it again."""
        if self._lists:
            self._dirty.add(agent_id)

    def begin(self, asker: AgentState) -> None:
        """A pick starts; the logs are applied at its first question (after the pick has asked for its jobs'
        capable sets, which take in changed reports). The last pick's asker is judged again at the next one: its
        pick may have asked nothing (its ask ended a refusal, which no log says), and what it took after its first
        question may move its free time with no free-slot change logged (an agent counted as one slot, holding
        more: a quicker task makes it free sooner)."""
        if self._asker is not None and self._lists:
            self._dirty.add(self._asker)
        self._pending, self._asker = asker, asker.row.id
        self._picks += 1

    def clear(self) -> None:
        for members_of in self._lists.values():
            members_of.live = False
        self._lists.clear()
        self._by_job.clear()
        self._dirty.clear()
        self._read = None

    def _sync(self, view: DispatchView, now: float) -> None:
        asker, self._pending = self._pending, None
        if now < self._now:   # the clock went back: free times judged passed may be ahead again
            self.clear()
        self._now = now
        members = view.connected_ids()   # refreshes presence first: leaves by time are in its log
        predictor = self.predictor
        read = self._read
        noted_at, noted = view.noted_since(read[2] if read is not None else 1 << 62)
        version = (view.presence_version(), view.slots_version(), noted_at, predictor.corrections_version())
        self._read = version
        if not self._lists:
            self._dirty.clear()
            return
        changed, self._dirty = self._dirty, set()
        if asker is not None:
            changed.add(asker.row.id)
        if read is not None and read != version:
            moves, slots = view.presence_since(read[0]), view.slots_since(read[1])
            corrected = predictor.corrected_since(read[3])
            if moves is None or slots is None or noted is None or corrected is None:
                self.clear()
                self._read = version
                return
            changed.update((i for i, _ in moves), slots, noted, corrected)
        agents = view.agents()
        connected: list[AgentState] | None = None
        for members_of in self._lists.values():
            if len(changed) > len(members_of.placed) // 8 + 64:   # sorting afresh is cheaper than moving each
                connected = view.connected() if connected is None else connected
                self._build(members_of, connected, now)
                continue
            due = members_of.due(now) if members_of.waits and members_of.waits[0][0] <= now else ()
            for agent_id in changed.union(due) if due else changed:
                self._judge(members_of, agent_id, agents.get(agent_id), members, now)

    def _judge(self, members_of: Members, agent_id: str, agent: AgentState | None,
               members: Container[str], now: float) -> None:
        member = agent is not None and agent_id in members and agent_id in members_of.capable and agent.refused is None
        members_of.judge(agent_id, members_of.placement(agent, self.predictor, now) if member and agent else None,
                         agent_id in self._flagged_of(members_of.kind))

    def _build(self, members_of: Members, connected: list[AgentState], now: float) -> None:
        """Place every member afresh: the capable connected agents not refused (as :meth:`_judge` has them)."""
        capable = members_of.capable
        members_of.build([a for a in connected if a.row.id in capable and a.refused is None], self.predictor, now,
                         self._flagged_of(members_of.kind))

    def _flagged_of(self, kind: str) -> Container[str]:
        return self.flagged(kind) if self.flagged is not None else ()

    def _members(self, view: DispatchView, job_id: str, req: Requirements, kind: str, half: bool, unit: str,
                 now: float) -> Members | None:
        """The job's member list, up to date (None: none kept, and none built this pick: the walk answers)."""
        if self._pending is not None:
            self._sync(view, now)
        self._uses += 1
        members_of = self._by_job.get((job_id, half, unit))   # (hashing requirements costs more than the count)
        if members_of is not None and members_of.live and members_of.reports == view.reports_version():
            # no report changed since its capable set was last the job's: the job's set now has the same members
            members_of.used, members_of.picked = self._uses, self._picks
            return members_of
        capable = view.capable(job_id)
        if members_of is None or not members_of.live:
            members_of = self._lists.get((req, kind, half, unit))
        if members_of is not None and members_of.capable is capable:
            members_of.used, members_of.picked = self._uses, self._picks
            if members_of.reports != view.reports_version():   # judged now: the capable set has taken them in
                reported = view.reports_since(members_of.reports)
                members_of.reports = view.reports_version()
                if reported is None:
                    members_of = None
                else:
                    members, agents = view.connected_ids(), view.agents()
                    for agent in reported:
                        self._judge(members_of, agent.row.id, agents.get(agent.row.id), members, now)
            if members_of is not None:
                self._remember(job_id, half, unit, members_of)
                return members_of
        # a build visits every capable connected agent (~10 ms at 10,000): one a pick at most, and never in place
        # of a list this pick uses (a submitter's dozens of distinct requirements would rebuild lists on every pick)
        key = (req, kind, half, unit)
        if self._built == self._picks:
            return None
        if key not in self._lists and len(self._lists) >= LISTS_MAX:
            oldest = min(self._lists, key=lambda k: self._lists[k].used)
            if self._lists[oldest].picked == self._picks:
                return None
            self._lists.pop(oldest).live = False
        self._built = self._picks
        if self._read is None:
            self._sync(view, now)   # (the first list: versions from here on)
        members_of = Members(req, kind, half, unit, capable)
        members_of.reports = view.reports_version()
        self._build(members_of, view.connected(), now)
        members_of.used, members_of.picked = self._uses, self._picks
        old = self._lists.pop(key, None)
        if old is not None:
            old.live = False
        self._lists[key] = members_of
        self._remember(job_id, half, unit, members_of)
        return members_of

    def _remember(self, job_id: str, half: bool, unit: str, members_of: Members) -> None:
        if len(self._by_job) > 4096:
            self._by_job.clear()
        self._by_job[(job_id, half, unit)] = members_of

    def count(self, view: DispatchView, job_id: str, job: JobRow, task: TaskRow, req: Requirements, asker: AgentState,
              mine: float, queued: int, ahead: Callable[[AgentState], int],
              shape: Hashable) -> tuple[int, int | None] | None:
        """(at least, at most) how many of the job's tasks the rivals finish before ``asker``, needing ``mine`` s
        from now, would finish one; the second is None where not worked out (the first reached ``queued``, or the
        sums ran long). None: not countable here (the walk answers). ``ahead(b)`` is the walk's count for one
        agent (0 for no rival); ``shape``: the task's shape (``Predictor.shape``, with its epoch): its cost and
        precision."""
        now = view.now()
        choice = self._units.get(shape)
        if choice is None:
            if len(self._units) > 4096:
                self._units.clear()
            choice = self._units[shape] = _unit(self.predictor.cost(job, task), task.params.get("dtype") in HALF)
        if choice is None or not 0 < mine < math.inf:
            return None
        unit, scale, other, half = choice
        members_of = self._members(view, job_id, req, job.kind, half, unit, now)
        if members_of is None:
            return None
        if other > 0 and not other * members_of.ratio <= scale * (1 - 1e-9):
            return None   # the other cost may set some member's runtime
        my_end = now + mine
        a_lo, a_hi, cut_lo, cut_hi = bounds(now, mine, scale, job.deadline_at)
        if not a_hi < KEY_MAX:
            return None   # a horizon so long that members kept out of the lists as finishing nothing might
        placed, odd, waits = members_of.placed, members_of.odd, members_of.waits
        # most questions: the idle members finishing one task first, less every member judged one by one, cover it
        first = bisect.bisect_left(members_of.idle, min(a_lo / (1 + 1e-9), cut_lo)) - 1 - \
            bisect.bisect_left(members_of.windows, (my_end + WINDOW_SLACK_S, ""))
        if first >= queued:
            return first, None
        # judged one by one: the asker, windows ending within the asker's task, odd keys ...
        asker_id = asker.row.id
        alone = [asker_id] if asker_id in placed else []
        near = bisect.bisect_left(members_of.windows, (my_end + WINDOW_SLACK_S, ""))
        if near or odd:
            if near + len(odd) > LOOK:
                return None
            alone = list(dict.fromkeys([*alone, *(agent_id for _, agent_id in members_of.windows[:near]), *odd]))
        flagged = members_of.flagged
        lo = hi = fixed = 0
        for agent_id in alone:
            key, free, _ = placed[agent_id]
            if free == -math.inf and listed(key) and agent_id not in flagged:   # in the idle sums: taken out
                lo -= entry(key, a_lo, cut_lo)
                hi -= entry(key, a_hi, cut_hi)
            if agent_id != asker_id:
                fixed += _ahead(ahead, view, agent_id, asker)
        lo += fixed
        listed_lo, listed_hi, complete = sums(members_of.idle, a_lo, a_hi, cut_lo, cut_hi, queued - lo)
        lo += listed_lo
        if lo >= queued or not complete:
            return lo, None
        # ... and members busy or paused until before the asker would finish (the others finish none first)
        hi += fixed + listed_hi
        if members_of.flag_keys:   # agents ``adaptive`` may avoid: rivals in the upper bound only
            _, flagged_hi, complete = sums(members_of.flag_keys, a_lo, a_hi, cut_lo, cut_hi, math.inf)
            if not complete:
                return lo, None
            hi += flagged_hi
        early = bisect.bisect_left(waits, (my_end, ""))
        if early <= LOOK:
            busy = sum(_ahead(ahead, view, agent_id, asker) for _, agent_id in waits[:early] if agent_id not in alone)
            lo += busy
            return (lo, None) if lo >= queued else (lo, hi + busy)
        # too many to judge: as if idle they finish no fewer (enough to show the asker should take) ...
        _, busy_hi, complete = sums(members_of.wait_keys, a_lo, a_hi, cut_lo, cut_hi, math.inf)
        most = hi + busy_hi if complete else None
        if most is not None and most < queued:
            return lo, most
        # ... and the earliest of them, judged, may show it should not
        lo += sum(_ahead(ahead, view, agent_id, asker) for _, agent_id in waits[:LOOK] if agent_id not in alone)
        return (lo, None) if lo >= queued else (lo, most)


def bounds(now: float, mine: float, scale: float, deadline_at: float | None) -> tuple[float, float, float, float]:
    """(a_lo, a_hi, cut_lo, cut_hi) for :func:`~hub.dispatch.members.sums`: an idle rival with key ``key`` finishes
    at least ``entry(key, a_lo, cut_lo)`` and at most ``entry(key, a_hi, cut_hi)`` tasks before an asker needing
    ``mine`` s from ``now`` would finish one, where the walk computes ``ceil((now + mine - now) / (key x scale) -
    1e-9) - 1`` and cuts a part ending past ``deadline_at``: the sum ``now + mine`` rounds within an ulp of it
    (:data:`ULPS` of ``now``), the rest within a relative :data:`EPS`."""
    slack = ULPS * math.ulp(now)
    a_lo, a_hi = (mine - slack) * (1 - EPS) / scale, (mine + slack) * (1 + EPS) / scale
    cut_lo = cut_hi = math.inf
    if deadline_at is not None:
        left_lo, left_hi = deadline_at - now - slack, deadline_at - now + slack
        cut_lo = left_lo * (1 - EPS) / scale if left_lo > 0 else 0.0
        cut_hi = left_hi * (1 + EPS) / scale if left_hi > 0 else 0.0
    return a_lo, a_hi, cut_lo, cut_hi


def _ahead(ahead: Callable[[AgentState], int], view: DispatchView, agent_id: str, asker: AgentState) -> int:
    b = view.agents().get(agent_id)
    return ahead(b) if b is not None and b is not asker else 0


def _unit(cost: Cost, half: bool) -> tuple[str, float, float, bool] | None:
    """(unit, the cost in it, the other cost, ``half``) when a runtime is ``cost x key`` on every agent."""
    seconds, flops, size = cost.seconds, cost.flops, cost.bytes
    if not (math.isfinite(seconds + flops + size) and min(seconds, flops, size) >= 0):
        return None
    if flops == 0 and size == 0:
        return ("seconds", seconds, 0.0, half) if seconds > 0 else None
    if seconds != 0:
        return None
    return ("flops", flops, size, half) if flops >= size else ("bytes", size, flops, half)
