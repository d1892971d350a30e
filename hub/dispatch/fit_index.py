"""``best-fit``'s "idle, smaller agents that absorb a job": summed from a tree, not walked agent by agent.

For each job an asker looks at, ``best-fit`` counts the free slots of idle, less capable agents that would run
the job's next task well (within the deadline, their window and ``well`` seconds), up to the queue's length.
With 10,000 mostly idle agents that walk visited thousands of agents per job, 200 jobs a pick (274 ms p99).

Here, per distinct (requirements, kind) a :class:`_Tree` holds the capable connected agents in capability
order (the asker's "smaller" ones are a prefix: one bisect) in a segment tree whose nodes keep the free
slots below them and what bounds their runtime: the largest learned correction, and the largest seconds per
FLOP and per byte times that correction (fp32 or fp16, whichever device ``base_seconds`` would use). A node
whose bound proves that every agent under it runs the task well counts its free slots at once; otherwise the
walk goes down, and a leaf is judged by the predictor itself, as before. The sum stops at the queue's length,
as the walk did; the answer is the walk's.

A leaf counts free slots only while its agent is idle, not refused and not told to pause: those change on
events the board logs (``Presence``'s slot log, the noted log, a pick of the agent's own, learned speeds in
``attempt_settled``), and a pause that runs out is put back from a heap of ends. An agent whose report changes
leaves its place (capability, slots and window come from the report) and is judged one by one among the
"unplaced" until the next rebuild, as are agents that join after it.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Container
from typing import TYPE_CHECKING

from hub.dispatch.predict import base_seconds
from hub.fleet import available_until, derived, slots_of
from jobs.kinds.base import Cost
from jobs.requirements import Capabilities, Requirements

if TYPE_CHECKING:
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from hub.protocols import DispatchView as FitView
    from hub.records import JobRow, TaskRow

__all__ = ["FitIndex", "asker_order", "capability"]

#: a node's runtime bound is stretched by this much before it proves anything (rounding in the products)
MARGIN = 1.0 + 1e-9
#: agents judged one by one (joined or re-registered since the tree was built) before the tree is rebuilt
UNPLACED_MAX = 64
#: leaves kept over all trees: this many per connected agent, and a spare (a tree per distinct requirements:
#: a submitter's thousand different ``requires`` must not cost a thousand fleet-sized trees). A leaf is ~425
#: bytes (10,000 agents: 4.2 MB a tree), so 10,000 connected agents cost at most ~24 MB; past the budget the
#: least recently used trees go, and a job whose tree does not fit is counted by the walk.
LEAVES_PER_AGENT = 4
LEAVES_SPARE = 1 << 14
_PER_FLOP = Cost(flops=1e9)
_PER_BYTE = Cost(bytes=1e9)
_FP32: dict[str, str] = {}
_FP16 = {"dtype": "float16"}


def capability(caps: Capabilities) -> tuple[float, float, float, float]:
    """An order of agents from least to most capable: GPU or not, VRAM, GFLOPS, RAM."""
    if caps.gpus:
        return (1.0, max(g.vram_gb for g in caps.gpus), max(g.gflops_fp32 for g in caps.gpus), caps.memory_gb)
    return (0.0, 0.0, caps.cpu_gflops, caps.memory_gb)


def _ordered(key: tuple[float, ...], fill: float) -> tuple[float, ...]:
    """``key`` with everything from its first NaN on replaced by ``fill``, so that it sorts.

    The walk compared tuples: with a NaN at position i, ``b < mine`` holds exactly when ``b[:i] < mine[:i]``
    (the NaN differs from everything and is less than nothing). Placing ``b`` with ``+inf`` from i on, and
    bisecting for ``mine`` with ``-inf`` from its own NaN on, gives that same answer in a sorted order."""
    for i, v in enumerate(key):
        if math.isnan(v):
            return key[:i] + (fill,) * (len(key) - i)
    return key


def asker_order(mine: tuple[float, ...]) -> tuple[float, ...]:
    """Where an asker of capability ``mine`` cuts a tree's order: the agents before it are its smaller ones."""
    return _ordered(mine, -math.inf)


class _Tree:
    """The capable connected agents of one (requirements, kind), in capability order, with node bounds."""

    def __init__(self, agents: list[AgentState], capable: set[str], req: Requirements, kind: str) -> None:
        self.kind = kind
        placed = sorted(((_ordered(derived(a, "capability", capability), math.inf), a.row.id), a) for a in agents)
        self.capable = capable                       # the kept capable set it follows (a new set: rebuild)
        self.keys = [k for k, _ in placed]
        self.agents: list[AgentState | None] = [a for _, a in placed]
        self.pos = {a.row.id: i for i, (_, a) in enumerate(placed)}
        self.size = size = 1 << max(len(placed) - 1, 0).bit_length()
        # per leaf, fixed while the agent keeps its place: seconds per 1e9 FLOP and per 1e9 bytes (the slower
        # of the fp32 and the fp16 device choice: a bound for either)
        self.per_flop = [max(base_seconds(_PER_FLOP, a.caps, req, _FP32), base_seconds(_PER_FLOP, a.caps, req, _FP16))
                         for _, a in placed]
        self.per_byte = [max(base_seconds(_PER_BYTE, a.caps, req, _FP32), base_seconds(_PER_BYTE, a.caps, req, _FP16))
                         for _, a in placed]
        self.free = [0] * (2 * size)                 # free slots counted below a node
        self.factor = [0.0] * (2 * size)             # largest correction below (free leaves only)
        self.flop = [0.0] * (2 * size)               # largest seconds per 1e9 FLOP x correction
        self.byte = [0.0] * (2 * size)               # largest seconds per 1e9 bytes x correction
        self.until = [math.inf] * (2 * size)         # earliest window end
        self.unplaced: dict[str, AgentState] = {}    # capable connected agents without a place
        self.reported: set[str] = set()              # agents with a new report since the build (see _apply)
        self.live = True                             # False once dropped from its index
        self.limit = max(UNPLACED_MAX, len(placed) // 64)   # judged one by one before a rebuild pays

    @property
    def leaves(self) -> int:
        return len(self.keys)


    def set_leaf(self, i: int, free: int, factor: float, until: float) -> None:
        """One leaf's values, and its ancestors' sums and bounds (bounds stop where they no longer change)."""
        node = i + self.size
        fr, fa, fl, by, un = self.free, self.factor, self.flop, self.byte, self.until
        if free > 0:
            fl_v, by_v = self.per_flop[i] * factor, self.per_byte[i] * factor
        else:
            factor, fl_v, by_v, until = 0.0, 0.0, 0.0, math.inf
        delta = free - fr[node]
        fr[node], fa[node], fl[node], by[node], un[node] = free, factor, fl_v, by_v, until
        node >>= 1
        bounds = True
        while node:
            left = 2 * node
            if delta:
                fr[node] += delta
            if bounds:
                right = left + 1
                f, x, b, u = max(fa[left], fa[right]), max(fl[left], fl[right]), max(by[left], by[right]), \
                    min(un[left], un[right])
                if f == fa[node] and x == fl[node] and b == by[node] and u == un[node]:
                    bounds = False
                else:
                    fa[node], fl[node], by[node], un[node] = f, x, b, u
            elif not delta:
                return
            node >>= 1


class FitIndex:
    """The trees of one ``best-fit`` policy, and the logs they follow."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._trees: OrderedDict[tuple[Requirements, str], _Tree] = OrderedDict()
        self._read: tuple[int, int, int, int] | None = None   # reports, presence, slots, noted: applied up to
        self._dirty: set[str] = set()                         # agents to judge again (learned speeds)
        self._quiet: list[tuple[float, str]] = []              # (pause end, agent id): free again then
        self._quiet_at: dict[str, float] = {}
        self._now = -math.inf
        self._by_job: dict[str, _Tree] = {}                  # job id -> its tree (hashing requirements is slow)

    # -- following the board ----------------------------------------------------------------------
    def learned(self, agent_id: str) -> None:
        """The agent's correction changed (a settled attempt)."""
        if self._trees:
            self._dirty.add(agent_id)

    def sync(self, view: FitView, asker: AgentState, now: float) -> None:
        """Apply what changed since the last pick (the asker is judged again: its own pick may have ended a
        gate's refusal, which no log tells). Call it after the pick has asked for its jobs' capable sets."""
        if now < self._now:   # the clock went back: pauses judged over may be pauses again
            self.clear()
        self._now = now
        members = view.connected_ids()   # refreshes presence first: leaves by time are in its log
        read = self._read
        noted_at, noted = view.noted_since(read[3] if read is not None else 1 << 62)
        version = (view.reports_version(), view.presence_version(), view.slots_version(), noted_at)
        self._read = version
        if not self._trees:
            self._dirty.clear()
            return
        changed, self._dirty = self._dirty, set()
        changed.add(asker.row.id)
        reported: set[str] = set()
        if read is not None and read != version:
            reports = view.reports_since(read[0])
            moves = view.presence_since(read[1])
            slots = view.slots_since(read[2])
            if reports is None or moves is None or slots is None or noted is None:
                self.clear()
                self._read = version
                return
            reported = {a.row.id for a in reports}
            changed.update(reported, (i for i, _ in moves), slots, noted)
        while self._quiet and self._quiet[0][0] <= now:
            at, agent_id = heapq.heappop(self._quiet)
            if self._quiet_at.get(agent_id) == at:
                del self._quiet_at[agent_id]
                changed.add(agent_id)
        self._forget_finished(view)
        agents, idle = view.agents(), view.idle_ids()
        for tree in self._trees.values():
            for agent_id in changed:
                self._apply(tree, agent_id, agents.get(agent_id), agent_id in reported, members, idle, now)

    def _apply(self, tree: _Tree, agent_id: str, agent: AgentState | None, reported: bool,
               members: Container[str], idle: Container[str], now: float) -> None:
        """Judge a placed agent again; one whose report changed loses its place. Connected agents without a
        place are kept while capable, and those with a new report whether or not (the kept capable set may not
        have taken the report in yet); each count judges them whole."""
        i = tree.pos.get(agent_id)
        if reported:
            tree.reported.add(agent_id)
            if i is not None:
                tree.set_leaf(i, 0, 0.0, math.inf)
                tree.agents[i] = None
                del tree.pos[agent_id]
                i = None
        if i is not None and agent is not None:
            self._judge(tree, i, agent, idle, now)
        elif agent is not None and agent_id in members and (agent_id in tree.reported or
                                                            agent_id in tree.capable):
            tree.unplaced[agent_id] = agent
        else:
            tree.unplaced.pop(agent_id, None)

    def _judge(self, tree: _Tree, i: int, agent: AgentState, idle: Container[str], now: float) -> None:
        agent_id = agent.row.id
        free = slots_of(agent) - len(agent.running) if agent_id in idle and agent.refused is None else 0
        if free > 0 and agent.quiet_until > now:   # told to pause: free again when the pause ends
            if self._quiet_at.get(agent_id) != agent.quiet_until:
                self._quiet_at[agent_id] = agent.quiet_until
                heapq.heappush(self._quiet, (agent.quiet_until, agent_id))
                if len(self._quiet) > 2 * len(self._quiet_at) + 1024:
                    self._quiet = [(t, a) for a, t in self._quiet_at.items()]
                    heapq.heapify(self._quiet)
            free = 0
        until = available_until(agent)
        if until is None or math.isnan(until):   # NaN: ``misfit`` never finds the window short
            until = math.inf
        tree.set_leaf(i, free, self.predictor.factor(agent_id, tree.kind), until)

    def _forget_finished(self, view: FitView) -> None:
        """Drop the trees no active job asks for. Each sync walks every kept tree for each changed agent, and
        the leaf budget drops nothing while a fleet is large: a submitter's thousands of finished one-task jobs,
        each with its own ``requires``, cost every pick thousands of trees' updates, for good. Looked at once
        the trees outnumber twice the active jobs (each look leaves at most one per active job: amortized)."""
        queues = view.queues
        if len(self._trees) <= 2 * len(queues) + 64:
            return
        live = {(queues.requirements(job.id), job.kind) for job in queues.jobs()}
        for key in [key for key in self._trees if key not in live]:
            self._trees.pop(key).live = False
        self._by_job = {job_id: tree for job_id, tree in self._by_job.items() if tree.live}

    def clear(self) -> None:
        for tree in self._trees.values():
            tree.live = False
        self._by_job.clear()
        self._trees.clear()
        self._quiet.clear()
        self._quiet_at.clear()
        self._dirty.clear()
        self._read = None

    # -- trees ------------------------------------------------------------------------------------
    def tree(self, view: FitView, job_id: str, capable: set[str], in_use: set[int], now: float) -> _Tree | None:
        """The job's tree, built if needed (None: over the leaf budget; the caller walks instead)."""
        tree = self._by_job.get(job_id)
        if tree is not None and tree.live and tree.capable is capable and self._fits(tree):
            return tree
        queues = view.queues
        key = (queues.requirements(job_id), queues.job(job_id).kind)
        tree = self._trees.get(key)
        if tree is not None and tree.capable is capable and self._fits(tree):
            self._trees.move_to_end(key)
            self._remember(job_id, tree)
            return tree
        if tree is not None:
            del self._trees[key]
            tree.live = False
        connected = view.connected()
        chosen = [a for a in connected if a.row.id in capable]
        budget = LEAVES_PER_AGENT * len(connected) + LEAVES_SPARE
        used = sum(t.leaves for t in self._trees.values())
        for old_key in list(self._trees):
            if used + len(chosen) <= budget:
                break
            if id(self._trees[old_key]) not in in_use:
                dropped = self._trees.pop(old_key)
                dropped.live = False
                used -= dropped.leaves
        if used + len(chosen) > budget:
            return None
        tree = _Tree(chosen, capable, key[0], key[1])
        idle = view.idle_ids()
        for i, a in enumerate(tree.agents):
            if a is not None:
                self._judge(tree, i, a, idle, now)
        self._trees[key] = tree
        self._remember(job_id, tree)
        return tree

    @staticmethod
    def _fits(tree: _Tree) -> bool:
        """Whether the tree answers without a rebuild: few agents are judged one by one. Past the limit, those
        the job's capable set leaves out go first (the set is current: the pick asked for it before the tree):
        a stranger's hundreds of registrations of agents that cannot run the job rebuilt every tree each 64."""
        if len(tree.unplaced) <= tree.limit and len(tree.reported) <= tree.limit:
            return True
        capable = tree.capable
        tree.reported = {i for i in tree.reported if i in capable}
        for agent_id in [i for i in tree.unplaced if i not in capable]:
            del tree.unplaced[agent_id]
        return len(tree.unplaced) <= tree.limit and len(tree.reported) <= tree.limit

    def _remember(self, job_id: str, tree: _Tree) -> None:
        if len(self._by_job) > 4096:
            self._by_job.clear()
        self._by_job[job_id] = tree

    # -- counting ---------------------------------------------------------------------------------
    def absorbed(self, tree: _Tree, agent: AgentState, job: JobRow, task: TaskRow, req: Requirements,
                 well: float, queued: int, now: float, idle: Container[str], capable: Container[str],
                 mine: tuple[float, ...], ordered: tuple[float, ...]) -> int:
        """Free slots of the tree's idle agents less capable than ``agent`` that run ``task`` well: exact
        below ``queued``, and at least ``queued`` when they cover it (the walk's answer, as it used it)."""
        absorbed = 0
        predictor = self.predictor
        for b in tree.unplaced.values():   # judged one by one, as the walk did
            if b is not agent and b.refused is None and b.quiet_until <= now and \
                    derived(b, "capability", capability) < mine and b.row.id in idle and b.row.id in capable and \
                    predictor.misfit(b, job, task, req, now) is None and predictor.predict(b, job, task, req) <= well:
                absorbed += slots_of(b) - len(b.running)
                if absorbed >= queued:
                    return absorbed
        cost = predictor.cost(job, task)
        seconds, flops, size = cost.seconds, cost.flops / 1e9, cost.bytes / 1e9
        end = bisect.bisect_left(tree.keys, (ordered,))
        # the bound is a maximum over products: only for finite, non-negative costs (a kind's estimate from a
        # hostile job's parameters may be neither; then every leaf is judged as the walk judged it)
        bounded = math.isfinite(seconds + flops + size) and min(seconds, flops, size) >= 0
        deadline = job.deadline_at
        fr, fa, fl, by, un, agents = tree.free, tree.factor, tree.flop, tree.byte, tree.until, tree.agents
        stack = [(1, 0, tree.size)]
        while stack:
            node, lo, hi = stack.pop()
            if fr[node] == 0 or end <= lo:
                continue
            if bounded and hi <= end:
                bound = (seconds * fa[node] + max(flops * fl[node], size * by[node])) * MARGIN
                if bound <= well and not (deadline is not None and now + bound > deadline) and \
                        not now + bound > un[node]:
                    absorbed += fr[node]
                    if absorbed >= queued:
                        return absorbed
                    continue
            if hi - lo == 1:
                leaf = agents[lo]
                if leaf is not None and leaf is not agent and predictor.misfit(leaf, job, task, req, now) is None \
                        and predictor.predict(leaf, job, task, req) <= well:
                    absorbed += fr[node]
                    if absorbed >= queued:
                        return absorbed
                continue
            mid = (lo + hi) // 2
            stack.append((2 * node + 1, mid, hi))
            stack.append((2 * node, lo, mid))
        return absorbed
