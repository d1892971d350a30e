"""``fastest``: each task goes where it is predicted to finish soonest.

An asking agent takes a job's tasks only as far as the other connected agents could not finish
them earlier: another agent, counted from when it is predicted to have a free slot, finishes
``ceil((my_end - its_free_at) / its_runtime) - 1`` of them strictly before this agent would finish
one. A slow host therefore waits while faster ones can absorb the queue, and joins in when the
queue is longer than they can clear. Predictions learn from observed wall times (``predict``).

With 10,000 agents the rivals are not all looked at: they are visited quickest first by their predicted speed
for the task's kind, from a kept order (``roster.KindOrder``), and the walk stops as soon as the answer is known:
the rivals so far cover the queue (take none), or even if every capable agent not yet visited finished as many
as its key allows (:meth:`SoonestGate.share`: an upper bound per remaining agent, summed over the rest of the
order by bisection, :meth:`~hub.dispatch.roster.Roster.most_after`), enough would be left for this one. Agents
that have run faster than measured (``Predictor.quick``) are visited first, exactly, so the bound holds for the
rest. The answer is the full sum's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub.dispatch.covers import GONE, KEEP, Cover, Covers, ceil_count
from hub.dispatch.predict import Predictor, candidate_jobs
from hub.dispatch.roster import KindOrder, Roster
from hub.dispatch.tally import Tally
from hub.fleet import available_until

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow
    from jobs.requirements import Requirements

__all__ = ["Fastest", "SoonestGate"]

#: an agent skipped for a job kind (e.g. by ``adaptive`` for its error rate)
Avoid = Callable[["AgentState", str], bool]
#: a bound computed in floating point is loosened by this much (a runtime is a product of rounded figures)
_SLACK = 1 - 1e-9
#: once rivals cover the queue, agents visited further for a cover that quicker askers can use too
EXTRA_VISITS = 128
#: once rivals cover the queue, a walk goes on until they finish this share more (up to EXTRA_VISITS agents): each
#: rival that asks takes its part out of the cover, and a cover with nothing to spare sent the next asker walking
SPARE = 4
#: capable agents a repair visits past a kept cover's last one before a new walk is cheaper
REPAIR_VISITS = 32
#: visits between two bounds of the unvisited agents from the roster (a few bisections each)
BOUND_EVERY = 64
#: rivals taken out of a kept cover that a repair counts afresh at most
GONE_VISITS = 256
#: a part holds this long less than its rival stays, fits the deadline or its window (epoch-time rounding)
HOLD_MARGIN_S = 1e-3


@dataclass
class _Group:
    """What one pick knows of a group of like jobs (``SoonestGate.share``)."""

    mine: float                      # this agent's runtime for the group's head task
    shape: Hashable                  # that task's shape, with its epoch (``Predictor.shape``)
    proven: int = 0                  # the rivals finish at least this many tasks before this agent finishes one
    most: int | None = None          # ... and at most this many (None: not known)
    tallied_to: int = -1             # the queue length the tally last counted to


class SoonestGate:
    """How many of a job's queued tasks one asking agent should take under earliest-finish-first."""

    def __init__(self, view: DispatchView, agent: AgentState, predictor: Predictor, now: float,
                 roster: Roster, avoid: Avoid | None = None, covers: Covers | None = None,
                 tally: Tally | None = None) -> None:
        self.view, self.queues, self.agent, self.predictor, self.now = view, view.queues, agent, predictor, now
        self.avoid, self.roster, self.covers, self.tally = avoid, roster, covers, tally
        roster.update(view)
        self._orders: dict[str, KindOrder] = {}   # per kind: the connected agents by predicted speed (once a pick)
        self._free: dict[str, float] = {}   # rival id -> when it has a free slot (once per pick)
        self._connected = view.connected_ids()
        #: per group of like jobs (see ``share``): the rivals' parts do not change within a pick
        self._groups: dict[Hashable, _Group] = {}
        self._last = 0   # the task count of the last part :meth:`_counted`
        self._floor = predictor.floor()   # no agent visited by its top speed runs faster than this x its cost
        self._asking: tuple[JobRow, TaskRow, Requirements, float]   # the question :meth:`_count` answers for

    def _rival(self, b: AgentState | None, kind: str) -> bool:
        """Whether ``b`` is another connected agent that may get work now (capability checked by the caller)."""
        return (b is not None and b is not self.agent and b.refused is None and b.row.id in self._connected
                and not (self.avoid is not None and self.avoid(b, kind)))

    def has_rival(self, job_id: str) -> bool:
        """Whether another connected agent could run the job at all."""
        kind, agents = self.queues.job(job_id).kind, self.view.agents()
        return any(self._rival(agents.get(b_id), kind) for b_id in self.view.capable(job_id))

    def _ahead(self, b: AgentState, job: JobRow, task: TaskRow, req: Requirements,
               my_end: float) -> tuple[int, float, float]:
        """How many of the job's tasks rival ``b`` finishes strictly before this agent would finish one (with
        when it is free and its runtime, when it finishes any)."""
        free = self._free.get(b.row.id)
        if free is None:
            free = self._free[b.row.id] = self.predictor.free_at(b, self.now)
        if free >= my_end:
            return 0, free, 0.0
        runtime = self.predictor.predict(b, job, task, req)
        if runtime <= 0:
            return 0, free, runtime
        n = ceil_count((my_end - free) / runtime - 1e-9) - 1
        if n <= 0:
            return 0, free, runtime   # finishes none before this agent would: whether it fits does not matter
        # Predictor.misfit, with the runtime already known: must finish by the deadline and its window
        end, until, deadline = free + runtime, available_until(b), job.deadline_at
        if (deadline is not None and end > deadline) or (until is not None and end > until):
            return 0, free, runtime
        return n, free, runtime

    def _part(self, b: AgentState | None, kind: str, job: JobRow, task: TaskRow, req: Requirements,
              my_end: float) -> tuple[AgentState, int, float, float] | None:
        """A visited agent's part, if it is a rival finishing any of the job's tasks before this agent would:
        (the rival, how many, when it is free, its runtime)."""
        if b is None or not self._rival(b, kind):
            return None
        n, free, runtime = self._ahead(b, job, task, req, my_end)
        return (b, n, free, runtime) if n > 0 else None

    def _late(self, b: AgentState | None, job: JobRow, task: TaskRow, req: Requirements) -> tuple[float, float] | None:
        """A visited rival that finishes none before this agent would (busy past its end, or slower), as a part a
        cover keeps all the same: (its runtime, until when it holds), if it fits the deadline and its window.
        Once the clock passes its free time it counts as free (``covers.Reach``), and a few picks later a walk
        would find it finishing one or two first: kept, it spares that walk."""
        free = self._free.get(b.row.id) if b is not None else None
        if b is None or free is None or not self._rival(b, job.kind):
            # not a rival (``_ahead`` notes the free time of each one it is asked about, but for any kind: an agent
            # ``adaptive`` avoids for this kind was kept as a late part, counted by later askers as a rival)
            return None
        runtime = self.predictor.predict(b, job, task, req)
        if not runtime > 0:
            return None
        end, until, deadline = free + runtime, available_until(b), job.deadline_at
        if (deadline is not None and end > deadline) or (until is not None and end > until):
            return None
        holds = self._holds_until(b, job, end)
        return (runtime, holds) if holds > self.now else None

    def _holds_until(self, b: AgentState, job: JobRow, end: float) -> float:
        """Until when rival ``b``'s part in a cover (covers.py) holds: while it stays connected without asking
        again, and its predicted ``end`` fits the job's deadline and its own window (both move with the clock)."""
        stay = self.view.stays_until(b)
        if stay is None:
            return self.now   # connected only by a lease: it may leave unheard
        until = stay - HOLD_MARGIN_S
        for limit in (job.deadline_at, available_until(b)):
            if limit is not None:
                until = min(until, self.now + (limit - end) - HOLD_MARGIN_S)
        return until

    def _order(self, kind: str) -> KindOrder:
        order = self._orders.get(kind)
        if order is None:
            order = self._orders[kind] = self.roster.for_kind(self.view, kind, self.predictor)
        return order

    def _visit(self, job_id: str, order: KindOrder) -> Iterator[tuple[int, float | None, str]]:
        """Capable agents to visit: the quick ones first (no bound: None), then quickest first for the kind (with
        their keys, correction / top speed, and positions in the order; -1 for the quick ones)."""
        capable, quick = self.view.capable(job_id), self.predictor.quick
        for b_id in quick:
            if b_id in capable:
                yield -1, None, b_id
        for position, key, b_id in order.fastest_first():
            if b_id in capable and b_id not in quick:
                yield position, key, b_id

    def _repair(self, job_id: str, group: Hashable, cover: Cover, job: JobRow, task: TaskRow, req: Requirements,
                my_end: float, total: int, queued: int) -> bool:
        """Whether more rivals, with the cover's parts (at least ``total``), still cover the queue: a few visits
        instead of a new walk when parts were taken out. First the rivals whose parts were taken out and the agents
        something happened to since (an agent that asked and was told none is most often a rival again, now
        counted afresh; an agent busy when the walk passed it has finished since), then those after the cover's
        last one in the order."""
        assert self.covers is not None
        capable, agents, kind = self.view.capable(job_id), self.view.agents(), job.kind
        visits = 0
        spare = queued + queued // SPARE   # counted on to this, as a walk: the next rival to ask takes its part out
        gone = list(dict.fromkeys(cover.gone + self.covers.asked_since(cover.asked, GONE_VISITS)))
        cover.gone, cover.asked = [], self.covers.asked_version()
        # the rivals counted here: a part that cannot be kept (it holds for less than the margin) is not in
        # ``cover.parts`` afterwards, and one standing past ``cover.resume`` was counted again below (twice)
        counted: set[str] = set()
        for i, b_id in enumerate(gone):
            if visits >= GONE_VISITS:
                cover.gone = (cover.gone + gone[i:])[-GONE:]
                break
            if b_id == self.agent.row.id:
                cover.gone.append(b_id)   # the asker (its own ask took it out): a rival for the next one
                continue
            if b_id not in capable or b_id in cover.parts:
                continue
            visits += 1
            counted.add(b_id)
            if self._counted(group, cover, b_id, agents.get(b_id), kind, job, task, req, my_end) is not None:
                total += self._last
                if total >= queued:
                    cover.gone = (cover.gone + gone[i + 1:])[-GONE:]
                    return True
        visits = 0
        for position, _, b_id in self._order(kind).fastest_first(cover.resume):
            if visits >= REPAIR_VISITS:
                return total >= queued
            cover.resume = position + 1
            if b_id not in capable or b_id in cover.parts or b_id in counted:
                continue
            visits += 1
            if self._counted(group, cover, b_id, agents.get(b_id), kind, job, task, req, my_end) is not None:
                total += self._last
                if total >= spare:
                    return True
        return total >= queued

    def _counted(self, group: Hashable, cover: Cover, b_id: str, b: AgentState | None, kind: str, job: JobRow,
                 task: TaskRow, req: Requirements, my_end: float) -> AgentState | None:
        """A visited agent's part added to the kept cover, if it is a rival (its task count in ``_last``)."""
        assert self.covers is not None
        if (part := self._part(b, kind, job, task, req, my_end)) is None:
            return None
        rival, self._last, free, runtime = part
        until = self._holds_until(rival, job, free + runtime)
        if until > self.now:
            self.covers.add(group, cover, b_id, free, runtime, until)
        return rival

    def _tallied(self, seen: _Group, job_id: str, job: JobRow, task: TaskRow, req: Requirements, queued: int,
                 need: int) -> int | None:
        """The answer from the sorted runtimes (``tally.py``), where its bounds settle it (None: they do not)."""
        assert self.tally is not None
        if seen.most is None and seen.tallied_to < queued:
            self._asking = (job, task, req, self.now + seen.mine)
            counted = self.tally.count(self.view, job_id, job, task, req, self.agent, seen.mine, queued, self._count,
                                       seen.shape)
            if counted is None:
                seen.tallied_to = 1 << 62   # not countable this pick
                return None
            seen.proven, seen.most, seen.tallied_to = max(seen.proven, counted[0]), counted[1], queued
        proven, most = seen.proven, seen.most
        if queued <= proven:
            return 0
        if most is not None and (most <= queued - need or most == proven):
            return min(queued - proven, need) if most == proven else need
        return None

    def _count(self, b: AgentState) -> int:
        """The walk's count for one agent: how many tasks it finishes first if it is a rival, else 0 (the job's
        head task and this agent's end as in the question being answered)."""
        job, task, req, my_end = self._asking
        part = self._part(b, job.kind, job, task, req, my_end)
        return part[1] if part is not None else 0

    def share(self, job_id: str, need: int) -> int:
        """``min(share, need)``: how many of the job's queued tasks this agent should take, at most ``need``."""
        queues, predictor, now = self.queues, self.predictor, self.now
        job = queues.job(job_id)
        task = predictor.head(queues, self.agent, job_id, now, job)
        if task is None or need <= 0:
            return 0
        req, queued = queues.requirements(job_id), queues.queued(job_id)
        # the jobs whose rivals' parts are these numbers (covers.py): same capable agents and corrections (the
        # requirements and kind), the same deadline, and a head task that costs the same on every device (its
        # shape: the cost, requirements and precision, as a number, quicker to hash than they are)
        shape = predictor.shape(job, task, req)   # (first: it may start the numbers over)
        group = (predictor.shape_epoch, shape, job.kind, job.deadline_at)
        seen = self._groups.get(group)
        if seen is None:   # this agent's runtime is the same for every job of the group
            seen = self._groups[group] = _Group(self.predictor.predict(self.agent, job, task, req), group[:2])
        mine, proven = seen.mine, seen.proven
        if queued <= proven:
            return 0   # rivals counted for another job of the group this pick finish at least this many first
        if self.tally is not None and (told := self._tallied(seen, job_id, job, task, req, queued, need)) is not None:
            return told
        cost = predictor.cost(job, task)
        my_end = now + mine
        horizon = my_end - now
        kept = self.covers.get(group, now) if self.covers is not None else None
        if kept is not None:
            total = self.covers.count(kept, horizon, queued, now) if self.covers is not None else 0
            if total >= queued or self._repair(job_id, group, kept, job, task, req, my_end, total, queued):
                seen.proven = max(proven, queued)
                return 0
        agents, kind = self.view.agents(), job.kind
        # connected capable agents not visited yet: at least the rivals among them (the roster holds no others)
        left = self.view.capable_connected(job_id)
        ahead = 0
        cover = Cover(group, now) if self.covers is not None else None
        covered, extra = False, 0   # once covered: how many more agents to visit for parts quicker askers need
        resume = 0
        check = 0   # visits until the rest are bounded from the order again (:meth:`Roster.most_after`)
        order = self._order(kind)

        def at_most(key: float) -> int | None:
            # Every agent from here on is not quick: its runtime is at least its correction (at least ``floor``)
            # x the cost at its top speed, so at least ``floor x cost.seconds + cost.flops x key`` (key: its
            # correction / top speed, in GFLOPS)
            fastest = (self._floor * cost.seconds + cost.flops * key / 1e9) * _SLACK
            return ceil_count(horizon / fastest - 1e-9) - 1 if fastest > 0 else None

        for position, key, b_id in self._visit(job_id, order):
            if key is not None:
                most = at_most(key)
                if most is not None:
                    if most <= 0:
                        break   # none of the rest finishes one before this agent would
                    if not covered and queued - (ahead + left * most) >= need:
                        return need   # even at best the rest leave ``need`` for this agent
                    if not covered and check <= 0:
                        # the same bound agent by agent: most of the rest are slower than ``speed``
                        rest = order.most_after(position, at_most, queued - ahead - need)
                        if rest is not None:
                            return need   # even at best the rest leave ``need`` for this agent
                        check = BOUND_EVERY
                    check -= 1
            if covered:
                extra -= 1
                if extra < 0 or ahead >= queued + queued // SPARE:
                    break
            if b_id in self._connected:
                left -= 1
            resume = max(resume, position + 1)
            if (part := self._part(b := agents.get(b_id), kind, job, task, req, my_end)) is None:
                if cover is not None and len(cover.parts) < KEEP and (late := self._late(b, job, task, req)):
                    cover.add(b_id, self._free[b_id] - now, *late)
                continue
            b, n, free, runtime = part
            ahead += n
            if cover is not None and len(cover.parts) < KEEP:
                until = self._holds_until(b, job, free + runtime)
                if until > now:
                    cover.add(b_id, free - now, runtime, until)
            if not covered and ahead >= queued:
                if cover is None:
                    seen.proven = max(proven, ahead)
                    return 0
                covered, extra = True, EXTRA_VISITS
        seen.proven = max(proven, ahead)
        if not covered:
            return min(queued - ahead, need)
        if self.covers is not None and cover is not None:
            cover.resume = resume
            cover.prove(horizon, now)   # this agent's question, answered again from the kept parts alone
            self.covers.keep(group, cover)
        return 0


class Fastest:
    name = "fastest"

    def __init__(self) -> None:
        self.predictor = Predictor()
        self.roster = Roster()
        self.covers = Covers()
        #: the sorted runtimes (None: covers and walks alone, as the tests of those run them)
        self.tally: Tally | None = Tally(self.predictor)

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now = view.now()
        self.covers.begin(view)
        self.covers.forget(agent.row.id)   # it asks: it may be told to pause, and it may take tasks
        if self.tally is not None:
            self.tally.begin(agent)
        gate = SoonestGate(view, agent, self.predictor, now, self.roster, covers=self.covers, tally=self.tally)
        picked: list[TaskRow] = []
        for job_id in candidate_jobs(view.queues, agent, view.capable):
            share = gate.share(job_id, slots - len(picked))
            if share:
                picked += self.predictor.take(view.queues, agent, job_id, share, now)
            if len(picked) >= slots:
                break
        return picked

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        self.covers.forget(agent_id)
        if self.tally is not None:
            self.tally.touch(agent_id)
        self.predictor.attempt_settled(agent_id, job, task, ok, failure, metrics)
