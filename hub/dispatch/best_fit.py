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

from typing import TYPE_CHECKING, Any

from hub.dispatch.fit_index import FitIndex, asker_order, capability
from hub.dispatch.predict import HALF, Predictor, candidate_jobs
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

    def pick(self, view: DispatchView, agent: AgentState, slots: int) -> list[TaskRow]:
        now, queues = view.now(), view.queues
        ranked = []
        for position, job_id in enumerate(candidate_jobs(queues, agent, view.capable)):
            job = queues.job(job_id)
            ranked.append((-job.priority, view.capable_connected(job_id), position, job_id))
        ranked.sort()
        self.index.sync(view, agent, now)   # after the capable sets took in new reports (candidate_jobs)
        picked: list[TaskRow] = []
        walk = _Walk(view, agent, now)
        for *_, job_id in ranked:
            queued = queues.queued(job_id)
            want = queued - self._absorbed(view, agent, job_id, walk, queued, now)
            if want > 0:
                picked += self.predictor.take(queues, agent, job_id, min(want, slots - len(picked)), now)
            if len(picked) >= slots:
                break
        return picked

    def _absorbed(self, view: DispatchView, agent: AgentState, job_id: str, walk: _Walk, queued: int,
                  now: float) -> int:
        """Tasks of the job that idle, less capable agents can take now and run well (counted until they
        cover the ``queued`` tasks: past that the asking agent takes none either way)."""
        job, req = view.queues.job(job_id), view.queues.requirements(job_id)
        task = self.predictor.head(view.queues, agent, job_id, now)
        if task is None:
            return 0
        well = max(WELL_FACTOR * self.predictor.predict(agent, job, task, req), WELL_S)
        capable = view.capable(job_id)
        tree = self.index.tree(view, job_id, capable, walk.trees, now)
        if tree is not None:
            walk.trees.add(id(tree))
            # jobs alike (same tree, task cost, dtype, deadline and "well") count alike: asked once a pick
            cost = self.predictor.cost(job, task)
            key = (id(tree), cost.seconds, cost.flops, cost.bytes, task.params.get("dtype") in HALF,
                   job.deadline_at, well)
            known = walk.counted.get(key)
            if known is not None and (known[1] or known[0] >= queued):
                return known[0]
            absorbed = self.index.absorbed(tree, agent, job, task, req, well, queued, now, walk.idle, capable,
                                           walk.mine, walk.order)
            walk.counted[key] = (absorbed, absorbed < queued)   # below the queue: the whole sum
            return absorbed
        return self.walk(walk.smaller(), agent, job, task, req, well, capable, queued, now)

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
        self.counted: dict[tuple[object, ...], tuple[int, bool]] = {}   # see BestFit._absorbed
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
