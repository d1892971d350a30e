"""Runtime prediction and the eligibility rule every capability-aware policy shares.

A task's predicted runtime on an agent is the kind's cost estimate over the agent's measured speed
(roofline: the slower of compute and memory traffic, plus the kind's fixed seconds), times a
correction learned from what this board has observed of that agent: an exponentially weighted
ratio of measured wall time to prediction, per (agent, kind), falling back to the agent's ratio
over all kinds. A task is eligible for an agent when every ``requires`` clause holds
(:func:`jobs.requirements.unmet`) and the predicted runtime fits both the job's deadline and the
agent's availability window (``available_until`` in its capability report, epoch seconds).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING, Any

from hub.fleet import available_until, slots_of
from jobs.catalog import get_kind
from jobs.kinds.base import Cost
from jobs.requirements import Capabilities, Gpu, Requirements, unmet
from security.errors import PanalError

if TYPE_CHECKING:
    from hub.fleet import AgentState
    from hub.protocols import QueueView
    from hub.records import JobRow, TaskRow

__all__ = ["Predictor", "base_seconds", "candidate_jobs", "slots_of"]

#: speeds assumed for a device that reported none (an agent without torch, a failed self-test)
DEFAULT_CPU_GFLOPS = 50.0
DEFAULT_GPU_GFLOPS = 2000.0
DEFAULT_CPU_BANDWIDTH_GBPS = 20.0
DEFAULT_GPU_BANDWIDTH_GBPS = 200.0
#: weight of the newest observation in the per (agent, kind) correction
ALPHA = 0.3
#: how many queued tasks of one job a policy looks at for one that fits (deadlines differ by cost)
SCAN = 16
#: an agent with a correction below this (faster than measured) is one of ``Predictor.quick``: bounds that
#: assume every other agent runs no faster than FLOOR x its measured speed look at these apart
FLOOR = 0.5
_LOG_FLOOR = math.log(FLOOR)
#: dtypes whose tasks run at a GPU's fp16 speed
HALF = ("float16", "bfloat16")
_CACHE_MAX = 200_000
#: leases noted before those of tasks no longer out are looked for (a cancelled job's leases settle no attempt)
LEASED_CHECK = 4096


def _bandwidth(raw: Any, default: float) -> float:
    value = raw.get("memory_bandwidth_gbps") if isinstance(raw, Mapping) else None
    return float(value) if isinstance(value, int | float) and value > 0 else default


def _gpu_speed(gpu: Gpu, half: bool) -> float:
    best = max(gpu.gflops_fp32, gpu.gflops_fp16) if half else gpu.gflops_fp32
    return best if best > 0 else DEFAULT_GPU_GFLOPS


def base_seconds(cost: Cost, caps: Capabilities, req: Requirements, params: Mapping[str, Any]) -> float:
    """Uncorrected runtime of ``cost`` on the device of ``caps`` that the task would use."""
    return seconds_at(cost, *device_speeds(caps, req, params.get("dtype") in HALF))


def seconds_at(cost: Cost, gflops: float, bandwidth: float) -> float:
    """Uncorrected runtime of ``cost`` on a device of ``gflops`` and ``bandwidth`` (GB/s): the roofline."""
    return cost.seconds + max(cost.flops / (gflops * 1e9), cost.bytes / (bandwidth * 1e9))


def device_speeds(caps: Capabilities, req: Requirements, half: bool) -> tuple[float, float]:
    """(GFLOPS, memory bandwidth GB/s) of the device of ``caps`` that a task of ``req`` and precision would use."""
    raw_gpus = caps.raw.get("gpus") or ()
    gflops, bandwidth = 0.0, 0.0
    if req.device != "cpu":
        for i, gpu in enumerate(caps.gpus):
            if req.gpu_fits(gpu) and _gpu_speed(gpu, half) > gflops:
                raw = raw_gpus[i] if i < len(raw_gpus) else {}
                gflops, bandwidth = _gpu_speed(gpu, half), _bandwidth(raw, DEFAULT_GPU_BANDWIDTH_GBPS)
    if gflops == 0.0:  # no usable GPU: the task runs on the CPU
        gflops = caps.cpu_gflops if caps.cpu_gflops > 0 else DEFAULT_CPU_GFLOPS
        bandwidth = _bandwidth(caps.raw.get("cpu"), DEFAULT_CPU_BANDWIDTH_GBPS)
    return gflops, bandwidth


def candidate_jobs(queues: QueueView, agent: AgentState,
                   capable: Callable[[str], Container[str]] | None = None) -> list[str]:
    """Active jobs with queued tasks whose requirements ``agent`` meets: highest priority first,
    then the earliest deadline (a job without one comes after those with one), then the oldest.
    ``capable(job_id)``, when given, is the job's capable agent ids (``DispatchView.capable``: the same
    answer as ``unmet``, kept instead of asked per job)."""
    jobs = []
    agent_id = agent.row.id
    for position, job_id in enumerate(queues.waiting()):
        job = queues.job(job_id)
        if (agent_id in capable(job_id)) if capable is not None else not unmet(
                queues.requirements(job_id), job.kind, agent.caps):
            jobs.append((-job.priority, job.deadline_at or math.inf, position, job_id))
    jobs.sort()
    return [job_id for *_, job_id in jobs]


class Predictor:
    """Predicts runtimes and learns, from settled attempts, how far off each agent's are."""

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self.log_ratio: dict[tuple[str, str], float] = {}   # (agent, kind) -> log(observed / predicted)
        self.agent_log_ratio: dict[str, float] = {}
        self.samples: dict[tuple[str, str], int] = {}
        self.leased: dict[str, tuple[str, float, float, float]] = {}  # task -> (agent, base s, at, end)
        self._costs: dict[str, Cost] = {}
        #: task id -> its *shape*: a small number per distinct (cost, requirements, half precision), the inputs of
        #: ``base_seconds`` besides the agent's report. Runtimes are kept per (agent, shape), not per task: the
        #: head of a sweep changes on every take, and keyed by task the walk recomputed every rival's runtime
        self._shapes: dict[str, int] = {}
        self._shape_ids: dict[tuple[Cost, Requirements, bool], int] = {}
        self._bases: dict[tuple[str, int], tuple[Capabilities, float]] = {}
        #: shape -> a small number per distinct (requirements, half precision): which device of an agent it runs on
        self._device_of: list[int] = []
        self._device_ids: dict[tuple[Requirements, bool], int] = {}
        #: (agent, that number) -> (its report, the device's GFLOPS and bandwidth), for ``base``
        self._devices: dict[tuple[str, int], tuple[Capabilities, float, float]] = {}
        #: how many times the shape numbers started over (a shape is told apart by (epoch, number))
        self.shape_epoch = 0
        #: agents whose corrections changed, in turn (``roster.KindOrder`` follows it); the first is number _base
        self._corrected: list[str] = []
        self._corrected_base = 0
        #: agent id -> how many of its corrections (per kind and overall) are below :data:`FLOOR`; an agent is
        #: here while it has one. Kept as they are learned: the corrections change only in ``attempt_settled``.
        self.quick: dict[str, int] = {}
        self._leased_live = 0   # leases found still out at the last look
        #: every correction as (log ratio, key): (agent, kind) or (agent,) for its overall one; a heap with stale
        #: entries (an entry holds while the correction still has its value), for :meth:`floor`
        self._lows: list[tuple[float, tuple[str, ...]]] = []

    # -- prediction -----------------------------------------------------------------------------
    def cost(self, job: JobRow, task: TaskRow) -> Cost:
        cost = self._costs.get(task.id)
        if cost is None:
            try:
                cost = get_kind(job.kind).estimate(task.params)
            except (PanalError, KeyError, TypeError, ValueError):
                cost = Cost()
            if len(self._costs) > _CACHE_MAX:
                self._costs.clear()
            self._costs[task.id] = cost
        return cost

    def shape(self, job: JobRow, task: TaskRow, req: Requirements) -> int:
        """The task's shape (see ``_shapes``): tasks of one shape take the same base time on any one agent."""
        shape = self._shapes.get(task.id)
        if shape is None:
            key = (self.cost(job, task), req, task.params.get("dtype") in HALF)
            shape = self._shape_ids.get(key)
            if shape is None:
                if len(self._shape_ids) > _CACHE_MAX:   # numbers are reused from here on: forget what they meant
                    self._shape_ids.clear()
                    self._shapes.clear()
                    self._bases.clear()
                    self._device_of.clear()
                    self._device_ids.clear()
                    self._devices.clear()
                    self.shape_epoch += 1
                shape = self._shape_ids[key] = len(self._shape_ids)
                self._device_of.append(self._device_ids.setdefault(key[1:], len(self._device_ids)))
            if len(self._shapes) > _CACHE_MAX:
                self._shapes.clear()
            self._shapes[task.id] = shape
        return shape

    def base(self, agent: AgentState, job: JobRow, task: TaskRow, req: Requirements) -> float:
        key = (agent.row.id, self.shape(job, task, req))
        cached = self._bases.get(key)
        if cached is not None and cached[0] is agent.caps:
            return cached[1]
        device = self._devices.get((agent.row.id, self._device_of[key[1]]))   # (a new asker: ~60 shapes, 6 devices)
        if device is None or device[0] is not agent.caps:
            device = (agent.caps, *device_speeds(agent.caps, req, task.params.get("dtype") in HALF))
            if len(self._devices) > _CACHE_MAX:
                self._devices.clear()
            self._devices[(agent.row.id, self._device_of[key[1]])] = device
        value = seconds_at(self.cost(job, task), device[1], device[2])
        if len(self._bases) > _CACHE_MAX:
            self._bases.clear()
        self._bases[key] = (agent.caps, value)
        return value

    def factor(self, agent_id: str, kind: str) -> float:
        """How much slower than its measured speed this agent has turned out to be (1.0: as measured)."""
        log_ratio = self.log_ratio.get((agent_id, kind), self.agent_log_ratio.get(agent_id))
        return 1.0 if log_ratio is None else math.exp(log_ratio)

    def predict(self, agent: AgentState, job: JobRow, task: TaskRow, req: Requirements) -> float:
        return self.base(agent, job, task, req) * self.factor(agent.row.id, job.kind)

    def misfit(self, agent: AgentState, job: JobRow, task: TaskRow, req: Requirements, now: float) -> str | None:
        """``"deadline"`` or ``"availability"`` when the predicted runtime does not fit; else None."""
        until = available_until(agent)
        if job.deadline_at is None and until is None:
            return None
        end = now + self.predict(agent, job, task, req)
        if job.deadline_at is not None and end > job.deadline_at:
            return "deadline"
        if until is not None and end > until:
            return "availability"
        return None

    def free_at(self, agent: AgentState, now: float) -> float:
        """When the agent is predicted to have a free slot (an idle agent told to pause: when it asks again)."""
        if len(agent.running) < slots_of(agent):
            return max(now, agent.quiet_until)
        ends = [self.leased[t][3] for t in agent.running if t in self.leased]
        return max(min(ends), now) if ends else now

    # -- taking tasks ---------------------------------------------------------------------------
    def head(self, queues: QueueView, agent: AgentState, job_id: str, now: float,
             job: JobRow | None = None) -> TaskRow | None:
        """The first of the job's queued tasks (among the next :data:`SCAN`) that fits the agent (``job``: the
        job's row, where the caller has it: this runs for every candidate job of a pick)."""
        if job is None:
            job = queues.job(job_id)
        if job.deadline_at is None and available_until(agent) is None:   # every task fits: the first one
            first = queues.peek(job_id, 1)
            return first[0] if first else None
        req = queues.requirements(job_id)
        first = queues.peek(job_id, 1)   # most often it fits: the next ones are not copied out for nothing
        if not first or self.misfit(agent, job, first[0], req, now) is None:
            return first[0] if first else None
        return next((t for t in queues.peek(job_id, SCAN)[1:] if self.misfit(agent, job, t, req, now) is None), None)

    def take(self, queues: QueueView, agent: AgentState, job_id: str, limit: int, now: float) -> list[TaskRow]:
        """Take up to ``limit`` of the job's next :data:`SCAN` queued tasks that fit the agent, and note
        them as leased."""
        job, req = queues.job(job_id), queues.requirements(job_id)
        picked: list[TaskRow] = []
        for task in queues.peek(job_id, SCAN) if limit > 0 else ():
            if self.misfit(agent, job, task, req, now) is None:
                picked.append(task)
                base = self.base(agent, job, task, req)
                self.leased[task.id] = (agent.row.id, base, now, now + base * self.factor(agent.row.id, job.kind))
                if len(picked) >= limit:
                    break
        queues.take(job_id, picked)
        if len(self.leased) > max(LEASED_CHECK, 2 * self._leased_live):
            self._forget_ended(queues)
        return picked

    def _forget_ended(self, queues: QueueView) -> None:
        """Forget the leases of tasks settled or gone (not those just taken: still queued until the board leases
        them). A job cancelled while its tasks are leased settles no attempt: a submitter who cancels mid-lease
        again and again left an entry per task for good. Looked for once the entries double (amortized)."""
        leased = self.leased
        for task_id in [t for t in leased if (row := queues.task(t)) is None or row.state.terminal]:
            del leased[task_id]
        self._leased_live = len(leased)

    # -- learning -------------------------------------------------------------------------------
    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        entry = self.leased.pop(task.id, None)
        self._costs.pop(task.id, None)
        self._shapes.pop(task.id, None)
        if entry is None or entry[0] != agent_id or not ok:
            return
        wall, base = metrics.get("wall_s"), entry[1]
        # not ``wall <= 0`` alone: a NaN passes it, and a NaN correction makes every runtime NaN and orders
        # nothing in ``_lows`` (a lower correction pushed below it stays buried: ``floor`` too high)
        if not isinstance(wall, int | float) or isinstance(wall, bool) or not 0 < wall < math.inf or not base > 0:
            return
        observed = math.log(min(max(wall / base, 1e-3), 1e3))
        key = (agent_id, job.kind)
        old = self.log_ratio.get(key)
        new = self.log_ratio[key] = observed if old is None else (1 - self.alpha) * old + self.alpha * observed
        self._note_quick(agent_id, old, new)
        self._note_low(key, new)
        self.samples[key] = self.samples.get(key, 0) + 1
        old = self.agent_log_ratio.get(agent_id)
        new = self.agent_log_ratio[agent_id] = observed if old is None else (
            (1 - self.alpha) * old + self.alpha * observed)
        self._note_quick(agent_id, old, new)
        self._note_low((agent_id,), new)
        self._corrected.append(agent_id)
        if len(self._corrected) > LEASED_CHECK:
            del self._corrected[:LEASED_CHECK // 2]
            self._corrected_base += LEASED_CHECK // 2

    def corrections_version(self) -> int:
        """How many corrections changed so far (with :meth:`corrected_since`)."""
        return self._corrected_base + len(self._corrected)

    def corrected_since(self, version: int) -> list[str] | None:
        """The agents whose corrections changed since ``version`` (None: too long ago to say)."""
        if version < self._corrected_base:
            return None
        return self._corrected[version - self._corrected_base:]

    def floor(self) -> float:
        """The smallest correction an agent that is not ``quick`` may have: at least :data:`FLOOR`, and with a
        fleet learned to run as measured (+-25%) ~0.8. A walk bounds the agents it has not visited by their top
        speed over this; with :data:`FLOOR` alone it visited every agent at least half as fast as the asker."""
        lows = self._lows
        while lows:
            value, key = lows[0]
            now = self.log_ratio.get((key[0], key[1])) if len(key) == 2 else self.agent_log_ratio.get(key[0])
            if now == value and value >= _LOG_FLOOR:
                break
            heapq.heappop(lows)   # changed since, or a quick agent's (those are visited apart)
        return math.exp(min(lows[0][0], 0.0)) if lows else 1.0   # an agent never observed: as measured (1.0)

    def _note_low(self, key: tuple[str, ...], value: float) -> None:
        lows = self._lows
        heapq.heappush(lows, (value, key))
        if len(lows) > 2 * (len(self.log_ratio) + len(self.agent_log_ratio)) + 64:   # mostly stale: rebuild
            lows[:] = [(v, (a, k)) for (a, k), v in self.log_ratio.items()]
            lows += [(v, (a,)) for a, v in self.agent_log_ratio.items()]
            heapq.heapify(lows)

    def _note_quick(self, agent_id: str, old: float | None, new: float) -> None:
        change = (new < _LOG_FLOOR) - (old is not None and old < _LOG_FLOOR)
        if change:
            count = self.quick.get(agent_id, 0) + change
            if count > 0:
                self.quick[agent_id] = count
            else:
                self.quick.pop(agent_id, None)
