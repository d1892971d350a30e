"""OOM-aware retries: a task that ran out of memory is retried on an agent with more of it.

:class:`MemoryHint` is a :class:`~hub.dispatch.BoardObserver`. When an attempt fails with ``oom``
it records, for that task, how much memory the failing agent offered the task: the VRAM of the GPU
it would run on for a GPU task (the largest of that agent's GPUs meeting the job's GPU clauses), its
RAM otherwise. :meth:`MemoryHint.needs_more_memory` then tells a policy whether an asking agent
would be no better: it offers no more of that kind of memory than an agent where the task already
ran out. An agent that would run the task on the other kind of device (the CPU after a GPU OOM, or
a GPU after a CPU OOM) is a different bet and is not held back.

The hint never starves a task: it holds an agent back only while a connected, unquarantined agent
that meets the job's requirements offers more. If the biggest machine around has already failed,
the retry goes to whoever asks, and the job's retry budget ends the story. A successful attempt
forgets the task.

:class:`MemoryAware` wraps any :class:`~hub.dispatch.DispatchPolicy` with this rule, so every
policy gets it without knowing about it: ``board.policy = MemoryAware(board.policy, hint)``, after the
board registered a learning policy as an observer (the wrapper does not expose ``attempt_settled``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub.dispatch.predict import connected
from jobs.errors import FailureClass
from jobs.requirements import Capabilities, Requirements, unmet

if TYPE_CHECKING:
    from hub.board import AgentState, Board
    from hub.dispatch import DispatchPolicy
    from hub.records import JobRow, TaskRow

__all__ = ["MemoryAware", "MemoryHint", "memory_offered"]

#: tasks remembered at most (the oldest OOM record is dropped first)
_TASKS_KEPT = 100_000


def memory_offered(req: Requirements, caps: Capabilities) -> tuple[str, float]:
    """``("gpu", VRAM GB)`` of the best GPU a task with ``req`` would use on ``caps``, else ``("cpu", RAM GB)``."""
    if req.wants_gpu(caps):
        return "gpu", max(g.vram_gb for g in caps.gpus if req.gpu_fits(g))
    return "cpu", caps.memory_gb


@dataclass
class _Oom:
    job_id: str
    kind: str
    req: Requirements
    failed_at: dict[str, float]   # "gpu" | "cpu" -> the most memory of that kind an attempt ran out in


class MemoryHint:
    """Remembers where tasks ran out of memory. ``board`` supplies agent capabilities and the fleet."""

    def __init__(self, board: Board, clock: Callable[[], float] | None = None) -> None:
        self.board = board
        self.clock = clock or board.clock
        self.tasks: OrderedDict[str, _Oom] = OrderedDict()

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        if ok:
            self.tasks.pop(task.id, None)
            return
        if failure != FailureClass.OOM.value:
            return
        agent = self.board.agents.get(agent_id)
        if agent is None:
            return
        req = self.board.requirements.get(job.id) or Requirements.from_dict(job.requires)
        device, amount = memory_offered(req, agent.caps)
        entry = self.tasks.get(task.id)
        if entry is None:
            entry = self.tasks[task.id] = _Oom(job.id, job.kind, req, {})
        entry.failed_at[device] = max(entry.failed_at.get(device, 0.0), amount)
        self.tasks.move_to_end(task.id)
        while len(self.tasks) > _TASKS_KEPT:
            self.tasks.popitem(last=False)

    def needs_more_memory(self, task_id: str, caps: Capabilities) -> bool:
        """Whether ``task_id`` should wait for an agent with more memory than ``caps`` offers."""
        entry = self.tasks.get(task_id)
        if entry is None or not self._no_better(entry, caps):
            return False
        # Hold back only while someone better is around to take it.
        for other in connected(self.board, self.clock()):
            if other.refused is None and not unmet(entry.req, entry.kind, other.caps) \
                    and not self._no_better(entry, other.caps):
                return True
        return False

    @staticmethod
    def _no_better(entry: _Oom, caps: Capabilities) -> bool:
        device, amount = memory_offered(entry.req, caps)
        failed = entry.failed_at.get(device)
        return failed is not None and amount <= failed


class MemoryAware:
    """A policy wrapper: tasks that need more memory than the asking agent has are hidden from it."""

    def __init__(self, inner: DispatchPolicy, hint: MemoryHint) -> None:
        self.inner = inner
        self.hint = hint
        self.name = inner.name

    def pick(self, board: Board, agent: AgentState, slots: int) -> list[TaskRow]:
        if not self.hint.tasks:
            return self.inner.pick(board, agent, slots)
        hidden: list[tuple[str, str]] = []
        for task_id, entry in self.hint.tasks.items():
            queue = board.ready.get(entry.job_id)
            if queue and task_id in queue and self.hint.needs_more_memory(task_id, agent.caps):
                queue.remove(task_id)
                hidden.append((entry.job_id, task_id))
        try:
            return self.inner.pick(board, agent, slots)
        finally:
            # Back at the front: the next agent with more memory should take them first.
            for job_id, task_id in reversed(hidden):
                queue = board.ready.get(job_id)
                if queue is not None:
                    queue.appendleft(task_id)

    def __getattr__(self, name: str) -> Any:
        # Attributes of the wrapped policy (its predictor, for explain_waiting) - but not its observer
        # hook: the board registered the inner policy as an observer already, once is enough.
        if name == "attempt_settled":
            raise AttributeError(name)
        return getattr(self.inner, name)
