"""Kept proofs that faster agents cover a job's queue, so a slow agent is told "none" without a walk.

Under ``fastest`` most asks end in "take none": the asking agent is slower than enough of the others. Proving
that means walking the rivals until they finish as many tasks as are queued, for each job the agent could
run: ~100 jobs x ~40 rivals on every ask. A :class:`Cover` keeps, per group of like jobs, the rivals such a
walk counted: for each, when it was free relative to the count (``offset``) and its runtime for the head task. For a
later agent needing ``horizon`` seconds, a rival then finishes at least
``ceil((horizon - offset - MARGIN_S) / runtime) - 1`` tasks before that agent would finish one, while
nothing that could lower it has happened:

- time passing lowers nothing: a rival's free time moves forward at most as fast as the clock, and so does
  the asking agent's end; a microsecond is kept in hand against rounding (:data:`MARGIN_S`);
- a rival's own events can: when it asks (it may be told to pause: a later free time), takes tasks or has an
  attempt settled (a new speed correction, a new error rate), its part is taken out (:meth:`Covers.forget`);
  so is it when its report changes (registering again, the speed check: capability, speed, slots, window)
  and when a gate begins refusing it or it is told to pause outside a pick (``DispatchView.noted_since``);
- leaving: a part holds only until the rival would drop out of the connected fleet without asking again, and
  while its predicted end still fits the job's deadline and its own window (``until``).

When the parts alone reach the queued count, the full sum would too: the agent takes none, as the walk says.
Otherwise the walk runs (and keeps a new cover). The parts are first asked all at once: each is at least
``(horizon - offset - MARGIN_S) / runtime - 1 - 1e-9``, so their sum is at least ``rate x horizon - lag``
with ``rate`` and ``lag`` summed over the parts (kept as parts are taken out): one multiplication answers
most questions. That sum loses up to one task per part, so it fails an agent nearly as quick as the rivals
(each finishing one or two tasks first: a proof of hundreds of parts). For those a cover keeps a few *proofs*:
for a horizon ``h0`` once asked, a lower bound of the parts' sum at ``h0``, adjusted as parts come and go (a
part adds or takes away exactly what it counts at ``h0``). The sum only grows with the horizon, so a proof
answers every agent needing ``h0`` or more. For quicker agents every part is counted at once by bisection
(:class:`Reach`: each part's first :data:`MARKS` task counts as sorted horizons, aged as the rivals' tasks end);
a part-by-part sum (at most :data:`LOOK` parts) answers the rest.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hub.protocols import DispatchView

__all__ = ["GONE", "KEEP", "LOOK", "MARGIN_S", "Cover", "Covers", "ceil_count", "finishes"]

#: parts are counted as if each rival had this much less time: time differences round within an ulp of the span
#: (~1e-11 s for days), not of the epoch; a millisecond was a task in ten of 20-50 ms ones (the walk ran again)
MARGIN_S = 1e-6
#: parts looked at per question at most
LOOK = 128
#: a part that holds for less than this after the count is left out of the all-at-once sum
LINEAR_MIN_S = 60.0
#: parts one walk keeps at most (an agent nearly as quick as the rivals needs hundreds)
KEEP = 1024
#: proofs a cover keeps at most (the quickest horizons)
PROOFS = 4
#: parts all covers hold together at most before they start over (memory: ~200 bytes a part)
PARTS_MAX = 1 << 19
#: rivals taken out that a cover remembers for its repair, the latest (the repair looks at 32 a time)
GONE = 256
#: tasks per part the sorted marks count (:meth:`Cover.reach`): an asker nearly as quick as its rivals sees each
#: finish one to three first; slower askers are answered by the all-at-once sum
MARKS = 4
#: parts coming due at once past which the marks are sorted again rather than moved one by one
REBUILD = 16
#: agents :meth:`Covers.forget` keeps in its log at most (then the older half goes)
ASKED_MAX = 8192
#: what an endless quotient counts as: more tasks than any queue holds
ENDLESS = 1 << 62


def ceil_count(x: float) -> int:
    """``math.ceil(x)`` for a quotient of times that a report may make infinite or NaN: a volunteer claiming
    1e-320 GFLOPS has an infinite runtime (its rivals finish endlessly many first: ``ceil`` raised
    OverflowError out of the pick), and infinity over infinity is NaN (counted as none)."""
    if -ENDLESS < x < ENDLESS:   # (a NaN fails both comparisons)
        return math.ceil(x)
    if x != x:
        return 0
    return ENDLESS if x > 0 else -ENDLESS


def finishes(horizon: float, offset: float, runtime: float) -> int:
    """How many tasks a part finishes at least before an agent needing ``horizon`` s finishes one."""
    return ceil_count((horizon - offset - MARGIN_S) / runtime - 1e-9) - 1


def marks(offset: float, runtime: float) -> list[float]:
    """Horizons above which a part finishes at least 1, 2, ... :data:`MARKS` tasks first: ``finishes`` is at
    least ``k`` once ``horizon > offset + MARGIN_S + runtime * (k + 1e-9)``; each mark is a billionth of its
    terms' size later, far beyond what rounding in either sum can move (~1e-16 of it), so a mark never counts a
    task that ``finishes`` (and the walk) would not."""
    base, slack = offset + MARGIN_S, 1e-9 * (abs(offset) + MARGIN_S)
    return [base + runtime * (k + 1e-9) + slack + 1e-9 * runtime * (k + 1) for k in range(1, MARKS + 1)]


@dataclass
class Cover:
    key: Hashable            # the group it was counted for (:meth:`Covers.get`)
    at: float                # counted at this time
    #: rival id -> (its free time - ``at``, its runtime, until when its part holds)
    parts: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    rate: float = 0.0        # sum of 1 / runtime over the parts held at least until ``until``
    lag: float = 0.0         # sum of (offset + MARGIN_S) / runtime + 1 + 1e-9 over the same parts
    until: float = math.inf  # the earliest end of those parts
    linear: set[str] = field(default_factory=set)   # those parts
    resume: int = 0          # the roster position after the last rival visited for it (a repair goes on there)
    #: [horizon, at least how many tasks the parts finish first at it, until when every counted part holds]
    proofs: list[list[float]] = field(default_factory=list)
    #: rivals whose parts were taken out, oldest first (a repair counts them afresh before visiting new ones)
    gone: list[str] = field(default_factory=list)
    #: the position in :meth:`Covers.asked_since`'s log up to which the repair has looked at the agents in it
    asked: int = 0
    #: the ``linear`` parts' marks (built when first asked, then kept as parts come and go)
    reached: Reach | None = None

    def add(self, agent_id: str, offset: float, runtime: float, until: float) -> None:
        self.parts[agent_id] = (offset, runtime, until)
        for proof in self.proofs:
            n = finishes(proof[0], offset, runtime)
            if n > 0:
                proof[1] += n
                proof[2] = min(proof[2], until)
        # a runtime so short that its rate overflows (a report's 1e300 GFLOPS) would leave NaN in the sums for good
        if until >= self.at + LINEAR_MIN_S and math.isfinite((abs(offset) + MARGIN_S) / runtime):
            self.linear.add(agent_id)
            self.rate += 1 / runtime
            self.lag += (offset + MARGIN_S) / runtime + 1 + 1e-9
            self.until = min(self.until, until)
            if self.reached is not None:
                self.reached.add(agent_id, offset, runtime)
                if len(self.reached.pending) > 2 * len(self.linear) + 64:   # mostly entries of parts gone since
                    self.reached.compact(self.parts, self.linear)

    def remove(self, agent_id: str) -> None:
        part = self.parts.pop(agent_id, None)
        if part is not None:
            self.gone.append(agent_id)
            if len(self.gone) > GONE:
                del self.gone[:len(self.gone) - GONE]
            for proof in self.proofs:
                proof[1] -= max(finishes(proof[0], part[0], part[1]), 0)
        if part is not None and agent_id in self.linear:
            self.linear.discard(agent_id)
            offset, runtime, _ = part
            self.rate -= 1 / runtime
            self.lag -= (offset + MARGIN_S) / runtime + 1 + 1e-9
            if self.reached is not None:
                self.reached.remove(agent_id, offset, runtime)

    def reach(self, horizon: float, now: float) -> int:
        """At least how many tasks the ``linear`` parts finish before an agent needing ``horizon`` s finishes one
        at ``now`` (each counted up to :data:`MARKS`; valid while ``now < until``): two bisections."""
        if self.reached is None:
            self.reached = Reach.build(self.at, self.parts, self.linear)
        return self.reached.count(horizon, now, self.parts, self.linear)

    def prove(self, horizon: float, now: float) -> None:
        """Keep the parts' sum at ``horizon`` (parts that still hold at ``now``) as a proof (one pass)."""
        total, holds = 0, math.inf
        for offset, runtime, until in self.parts.values():
            if now < until and (n := finishes(horizon, offset, runtime)) > 0:
                total += n
                holds = min(holds, until)
        self.proofs.append([horizon, total, holds])
        if len(self.proofs) > PROOFS:   # the slowest horizon answers the fewest agents
            self.proofs.remove(max(self.proofs, key=lambda proof: proof[0]))


class Reach:
    """A cover's parts as sorted :func:`marks`, so that any horizon's count is a bisection, and aged: a part counted
    while its rival was busy (free ``offset`` s after the count) is counted as free from the moment the clock
    passes that offset. Between the rival's own events (each takes its part out) its free time is its last lease's
    predicted end or its pause's end, fixed, or the clock when that has passed: a rival busy at the count is, once
    that time has passed, free at every later moment, and finishes as many as an idle one. Walks in a busy fleet
    count many rivals mid-task; a few picks later the same rivals, idle, finish twice as many (measured in
    ``sim_picks``), and without this the cover fell short of the queue and the walk ran again."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.idle: list[float] = []     # marks of parts free at the count or since: as if free now (offset <= 0)
        self.busy: list[float] = []     # marks of the others, at their offsets
        self.pending: list[tuple[float, str]] = []   # (offset, agent id) of the busy ones, earliest first
        self.aged: set[str] = set()     # the parts whose marks are in ``idle``
        self.aged_to = 0.0              # the latest ``now - at`` parts were aged to

    @classmethod
    def build(cls, at: float, parts: dict[str, tuple[float, float, float]], members: set[str]) -> Reach:
        """The marks of ``parts[members]``, sorted once (inserted one by one, a thousand parts cost milliseconds)."""
        reach = cls(at)
        for agent_id in members:
            offset, runtime, _ = parts[agent_id]
            if offset <= 0:
                reach.aged.add(agent_id)
                reach.idle += marks(offset, runtime)
            else:
                reach.busy += marks(offset, runtime)
                reach.pending.append((offset, agent_id))
        reach.idle.sort()
        reach.busy.sort()
        heapq.heapify(reach.pending)
        return reach

    def add(self, agent_id: str, offset: float, runtime: float) -> None:
        if offset <= 0:
            self.aged.add(agent_id)
            for mark in marks(offset, runtime):
                bisect.insort(self.idle, mark)
        else:
            for mark in marks(offset, runtime):
                bisect.insort(self.busy, mark)
            heapq.heappush(self.pending, (offset, agent_id))

    def remove(self, agent_id: str, offset: float, runtime: float) -> None:
        """Take out a part added with these figures (the same marks are computed again: found exactly)."""
        if agent_id in self.aged:
            self.aged.discard(agent_id)
            self._drop(self.idle, marks(min(offset, 0.0), runtime))
        else:
            self._drop(self.busy, marks(offset, runtime))

    def compact(self, parts: dict[str, tuple[float, float, float]], members: set[str]) -> None:
        """Keep only the busy parts' entries in ``pending``. A part taken out leaves its entry until the clock
        passes its offset; a rival busy far ahead (a kept late part) that registers again and again is taken out
        and counted again each time, an entry each, for as long as the cover is repaired rather than rebuilt."""
        self.pending = [(parts[a][0], a) for a in members if a not in self.aged]
        heapq.heapify(self.pending)

    @staticmethod
    def _drop(sorted_marks: list[float], gone: list[float]) -> None:
        for mark in gone:
            del sorted_marks[bisect.bisect_left(sorted_marks, mark)]

    def count(self, horizon: float, now: float, parts: dict[str, tuple[float, float, float]],
              members: set[str]) -> int:
        pending, elapsed = self.pending, now - self.at
        if elapsed < self.aged_to:
            return 0   # the clock went back: parts aged since may be busy again at this time (no bound)
        self.aged_to = elapsed
        due: dict[str, None] = {}
        while pending and pending[0][0] <= elapsed:
            offset, agent_id = heapq.heappop(pending)
            part = parts.get(agent_id)
            if part is None or part[0] != offset or agent_id in self.aged or agent_id not in members:
                continue   # taken out since (and perhaps counted again, with its own entry)
            due[agent_id] = None   # (once: taken out and counted again at the same offset, it has two entries)
        if len(due) > REBUILD:   # a walk's busy rivals all come due a pick later: sort once, not insert each
            self.aged.update(due)
            self.idle += [m for agent_id in due for m in marks(0.0, parts[agent_id][1])]
            self.idle.sort()
            aged = self.aged
            self.busy = sorted(m for agent_id in members if agent_id not in aged for m in marks(*parts[agent_id][:2]))
        else:
            for agent_id in due:
                self._drop(self.busy, marks(*parts[agent_id][:2]))
                self.aged.add(agent_id)
                for mark in marks(0.0, parts[agent_id][1]):
                    bisect.insort(self.idle, mark)
        return bisect.bisect_left(self.idle, horizon) + bisect.bisect_left(self.busy, horizon + elapsed)


class Covers:
    """Per group of jobs, at most one :class:`Cover`; per agent, the groups whose cover counts it.

    A group is every job whose rivals' parts are the same numbers (``SoonestGate.group``: the same requirements
    and kind, so the same capable agents and corrections; the same deadline; a head task of the same cost and
    dtype, so the same runtimes). Jobs of a group differ only in how many tasks they have queued, which each
    question brings along: one cover answers them all, and one rival that asks breaks one cover per group, not
    one per job (a sweep split into 200 jobs of ~50 kinds of work rebuilt 140 covers in one pick)."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, Cover] = {}              # group -> its cover
        self._by_agent: dict[str, set[Hashable]] = {}       # agent id -> the groups whose cover counts it
        self._parts = 0                                     # parts held by all covers
        self._reports = 0
        self._noted = 0
        #: agents something happened to (:meth:`forget`), in turn; the first is number ``_asked_base``. A walk
        #: passes agents that are no rival then and keeps no part of them (busy past the asker's end and connected
        #: only by their lease, or the asker itself); most become rivals after an event of their own (a result,
        #: an ask that is told none), and a repair counts the agents in this log since the cover was made first.
        self._asked: list[str] = []
        self._asked_base = 0
        self._pick_start = 0

    def begin(self, view: DispatchView) -> None:
        """A pick starts: the parts of agents whose report changed (a registration, the speed check) or whose
        standing changed outside a pick of their own (a refusal, a pause) are taken out."""
        self._pick_start = self.asked_version()
        version = view.reports_version()
        changed_reports = view.reports_since(self._reports) if version != self._reports else []
        self._reports = version
        self._noted, changed = view.noted_since(self._noted)
        if changed is None or changed_reports is None:   # too far behind to say who: start over
            self._clear()
            return
        for agent in changed_reports:
            self.forget(agent.row.id)
        for agent_id in changed:
            self.forget(agent_id)

    def get(self, group: Hashable, now: float) -> Cover | None:
        """The group's cover, if it was not counted in the future."""
        cover = self._groups.get(group)
        return cover if cover is not None and cover.at <= now else None

    @staticmethod
    def count(cover: Cover, horizon: float, queued: int, now: float) -> int:
        """At least how many tasks the cover's rivals finish before an agent needing ``horizon`` s finishes one
        (counting stops at ``queued``; at most :data:`LOOK` parts are looked at one by one)."""
        reached = 0
        if now < cover.until:
            if cover.rate * horizon - cover.lag >= queued + 1:   # + 1: rounding in the sums
                return queued
            if cover.linear and (reached := cover.reach(horizon, now)) >= queued:
                return queued
        for at, total, holds in cover.proofs:
            if at <= horizon and total >= queued and now < holds:
                return queued
        total = max((int(total) for at, total, holds in cover.proofs if at <= horizon and now < holds), default=0)
        looking = total
        total = 0
        for looked, (offset, runtime, until) in enumerate(cover.parts.values()):
            if looked >= LOOK:
                break
            if now >= until:
                continue
            n = finishes(horizon, offset, runtime)
            if n > 0:
                total += n
                if total >= queued:
                    break
        return max(total, looking, reached)

    def covered(self, group: Hashable, horizon: float, queued: int, now: float) -> bool:
        """Whether the kept parts prove that an agent needing ``horizon`` s should take none of a job of the
        group with ``queued`` tasks."""
        cover = self.get(group, now)
        return cover is not None and self.count(cover, horizon, queued, now) >= queued

    def add(self, group: Hashable, cover: Cover, agent_id: str, free: float, runtime: float, until: float) -> None:
        """Add a rival counted now to the group's kept cover (its free time taken relative to ``cover.at``: a
        later count only understates what it finishes)."""
        if self._groups.get(group) is cover and agent_id not in cover.parts and self._parts < PARTS_MAX:
            cover.add(agent_id, free - cover.at, runtime, until)
            self._by_agent.setdefault(agent_id, set()).add(group)
            self._parts += 1

    def keep(self, group: Hashable, cover: Cover) -> None:
        """Keep ``cover`` for the group (replacing the one it had)."""
        self._drop(group)
        if not cover.parts or len(cover.parts) > PARTS_MAX:
            return
        cover.asked = self._pick_start   # (the asker of this pick included: told none, it is a rival again)
        # groups of jobs long finished, or more parts than memory allows: start over (a cover is only a shortcut)
        if len(self._groups) >= 4096 or self._parts + len(cover.parts) > PARTS_MAX:
            self._clear()
        self._groups[group] = cover
        self._parts += len(cover.parts)
        for agent_id in cover.parts:
            self._by_agent.setdefault(agent_id, set()).add(group)

    def asked_version(self) -> int:
        return self._asked_base + len(self._asked)

    def asked_since(self, version: int, most: int) -> list[str]:
        """The last ``most`` agents :meth:`forget` was told of since ``version``, oldest first."""
        start = max(version - self._asked_base, len(self._asked) - most, 0)
        return self._asked[start:]

    def forget(self, agent_id: str) -> None:
        """Something happened to this agent: its parts no longer prove anything."""
        asked = self._asked
        asked.append(agent_id)
        if len(asked) > ASKED_MAX:
            del asked[:ASKED_MAX // 2]
            self._asked_base += ASKED_MAX // 2
        for group in self._by_agent.pop(agent_id, ()):
            cover = self._groups.get(group)
            if cover is not None and agent_id in cover.parts:
                cover.remove(agent_id)
                self._parts -= 1

    def _drop(self, group: Hashable) -> None:
        cover = self._groups.pop(group, None)
        if cover is not None:
            self._parts -= len(cover.parts)
            for agent_id in cover.parts:
                groups = self._by_agent.get(agent_id)
                if groups is not None:
                    groups.discard(group)
                    if not groups:
                        del self._by_agent[agent_id]

    def _clear(self) -> None:
        self._groups.clear()
        self._by_agent.clear()
        self._parts = 0

    def __len__(self) -> int:
        return len(self._groups)
