"""``best-fit``: a task goes to the least capable agent that can still run it well.

Big GPUs stay free for the work only they can do. An asking agent looks at the jobs it can run,
highest priority first and, among equals, the scarcest first (the fewest connected agents meet the
requirements: the 40 GB job before the one any GPU can run). It leaves a job's tasks to idle, less
capable agents that can run them well - within the deadline and availability window, and at most
:data:`WELL_FACTOR` times slower than itself (or under :data:`WELL_S` seconds) - and takes only
what those cannot absorb, so a big GPU never idles while a queue is longer than the small ones.

What the small ones absorb is summed from a kept index (:mod:`hub.dispatch.fit_index`): a tree per distinct
requirements whose nodes bound their agents' runtimes, so a pick with 10,000 idle agents does not walk them.
The walk below stays as the rule the index answers for, and runs where the index's memory budget is spent.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from hub.dispatch.fit_index import FitIndex, asker_order, capability
from hub.dispatch.predict import HALF, Predictor
from hub.fleet import derived, slots_of

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow
    from jobs.requirements import Requirements

__all__ = ["BestFit", "capability"]

#: "runs it well": no more than this many times slower than the asking agent ...
WELL_FACTOR = 4.0
#: ... or done within this many seconds anyway
WELL_S = 60.0


class BestFit:
    name = "best-fit"

    def __init__(self) -> None:
        self.predictor = Predictor()
        self.index = FitIndex(self.predictor)
        self._sets_kept: dict[str, set[str]] = {}
        self._sets_read = -1

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now, queues = view.now(), view.queues
        # The jobs it may run (``candidate_jobs``), ranked by priority, then scarcity (connected agents able to
        # run it: counted once per capable set, jobs asking the same share it), then the candidates' own order
        # (the earliest deadline, then the queue's order) - one sort where two were (the same order).
        ranked = []
        counts: dict[int, int] = {}
        found: dict[str, tuple[JobRow, set[str]]] = {}
        agent_id = agent.row.id
        sets = self._sets(view)
        position = -1
        for position, job_id in enumerate(queues.waiting()):
            capable = sets.get(job_id)
            if capable is None:
                capable = sets[job_id] = view.capable(job_id)
            if agent_id not in capable:
                continue
            job = queues.job(job_id)
            scarcity = counts.get(id(capable))
            if scarcity is None:
                scarcity = counts[id(capable)] = view.capable_connected(job_id)
            ranked.append((-job.priority, scarcity, job.deadline_at or math.inf, position, job_id))
            found[job_id] = (job, capable)
        if len(sets) > 2 * (position + 1) + 64:   # finished jobs: forget
            self._sets_kept = {}
        ranked.sort()
        self.index.sync(view, agent, now)   # after the capable sets took in new reports (above)
        picked: list[TaskRow] = []
        walk = _Walk(view, agent, now)
        counted, cost_of = walk.counted, self.predictor.cost
        for *_, job_id in ranked:
            queued = queues.queued(job_id)
            job, capable = found[job_id]
            first = queues.peek(job_id, 1)
            if not first:
                continue
            # most jobs a pick looks at are counted already (see _count): answered here, without calls
            task = first[0]
            cost = cost_of(job, task)
            known = counted.get((id(capable), cost.seconds, cost.flops, cost.bytes, task.params.get("dtype") in HALF,
                                 job.deadline_at))
            if known is not None and known[0] and (known[3] or known[2] >= queued):
                absorbed = known[2]
            else:
                absorbed = self._absorbed(view, agent, job, capable, walk, queued, now)
            want = queued - absorbed
            if want > 0:
                picked += self.predictor.take(queues, agent, job_id, min(want, slots - len(picked)), now)
            if len(picked) >= slots:
                break
        return picked

    def _sets(self, view: DispatchView) -> dict[str, set[str]]:
        """Job id -> its kept capable set, as ``view.capable`` gives it: while no report changes, each job's
        answer is the same set object, unchanged (sets change only as reports do), so a pick need not ask
        ~200 times again."""
        version = view.reports_version()
        if version != self._sets_read:
            self._sets_kept, self._sets_read = {}, version
        return self._sets_kept

    def _absorbed(self, view: DispatchView, agent: AgentState, job: JobRow, capable: set[str], walk: _Walk,
                  queued: int, now: float) -> int:
        """Tasks of the job that idle, less capable agents can take now and run well (counted until they
        cover the ``queued`` tasks: past that the asking agent takes none either way)."""
        queues, predictor, job_id = view.queues, self.predictor, job.id
        first = queues.peek(job_id, 1)
        if not first:
            return 0
        tree = self.index.tree(view, job_id, capable, walk.trees, now)
        if tree is None:   # over the trees' budget: the walk
            task = predictor.head(queues, agent, job_id, now)
            if task is None:
                return 0
            req = queues.requirements(job_id)
            well = max(WELL_FACTOR * predictor.predict(agent, job, task, req), WELL_S)
            return self.walk(walk.smaller(), agent, job, task, req, well, capable, queued, now)
        walk.trees.add(id(tree))
        count = self._count(view, walk, tree, agent, job, first[0], capable, queued, now)
        if count is not None:
            return count
        task = predictor.head(queues, agent, job_id, now)   # the first task does not fit the asker
        if task is None:
            return 0
        count = self._count(view, walk, tree, agent, job, task, capable, queued, now)
        assert count is not None   # ``head`` gave a task that fits
        return count

    def _count(self, view: DispatchView, walk: _Walk, tree: Any, agent: AgentState, job: JobRow, task: TaskRow,
               capable: set[str], queued: int, now: float) -> int | None:
        """The absorbed count for ``task`` as the job's head (None: it does not fit the asker). Jobs alike
        count alike: the tree (requirements, kind), the task's cost and dtype and the deadline decide whether
        it fits the asker, "well" (the asker's runtime) and each smaller agent's verdict, so a pick asks once."""
        predictor = self.predictor
        cost = predictor.cost(job, task)
        key = (id(capable), cost.seconds, cost.flops, cost.bytes, task.params.get("dtype") in HALF, job.deadline_at)
        known = walk.counted.get(key)
        req = None
        if known is None:
            req = view.queues.requirements(job.id)
            fits = predictor.misfit(agent, job, task, req, now) is None
            well = max(WELL_FACTOR * predictor.predict(agent, job, task, req), WELL_S) if fits else 0.0
            known = walk.counted[key] = [fits, well, -1, False]
        if not known[0]:
            return None
        absorbed: int = known[2]
        if known[3] or absorbed >= queued:
            return absorbed
        absorbed = self.index.absorbed(tree, agent, job, task, req or view.queues.requirements(job.id), known[1],
                                       queued, now, walk.idle, capable, walk.mine, walk.order)
        known[2], known[3] = absorbed, absorbed < queued   # below the queue: the whole sum
        return absorbed

    def walk(self, smaller: list[AgentState], agent: AgentState, job: JobRow, task: TaskRow, req: Requirements,
             well: float, capable: set[str], queued: int, now: float) -> int:
        """The rule the index answers for: every idle, less capable agent looked at in turn."""
        absorbed = 0
        for b in smaller:
            if b.row.id in capable and self.predictor.misfit(b, job, task, req, now) is None \
                    and self.predictor.predict(b, job, task, req) <= well:
                absorbed += slots_of(b) - len(b.running)
                if absorbed >= queued:
                    break
        return absorbed

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        self.predictor.attempt_settled(agent_id, job, task, ok, failure, metrics)
        self.index.learned(agent_id)


class _Walk:
    """One pick's idle, less capable agents, listed only if some job has no tree (the index is over budget)."""

    def __init__(self, view: DispatchView, agent: AgentState, now: float) -> None:
        self._view, self._agent, self._now = view, agent, now
        self._smaller: list[AgentState] | None = None
        self.trees: set[int] = set()   # the trees this pick uses (not dropped to make room for another)
        #: (capable set: one per requirements and kind, so one per tree; task cost, dtype, deadline) ->
        #: [fits the asker, "well", absorbed so far, the whole sum]
        self.counted: dict[tuple[object, ...], list[Any]] = {}
        self.idle = view.idle_ids()
        self.mine = derived(agent, "capability", capability)
        self.order = asker_order(self.mine)

    def smaller(self) -> list[AgentState]:
        if self._smaller is None:
            agent, now = self._agent, self._now
            mine = derived(agent, "capability", capability)
            # Only agents with a free slot can absorb anything: the fleet keeps them apart (``view.idle``).
            self._smaller = [b for b in self._view.idle() if b is not agent and b.refused is None
                             and b.quiet_until <= now and derived(b, "capability", capability) < mine]
        return self._smaller
