"""OOM-aware retries: a task that ran out of memory is retried on an agent with more of it.

:class:`MemoryHint` is a :class:`~hub.protocols.BoardObserver`. When an attempt fails with ``oom``
it records, for that task, how much memory the failing agent offered the task: the VRAM of the GPU
it would run on for a GPU task (the largest of that agent's GPUs meeting the job's GPU clauses), its
RAM otherwise. :meth:`MemoryHint.needs_more_memory` then tells whether an asking agent
would be no better: it offers no more of that kind of memory than an agent where the task already
ran out. An agent that would run the task on the other kind of device (the CPU after a GPU OOM, or
a GPU after a CPU OOM) is a different bet and is not held back.

The hint never starves a task: it holds an agent back only while a connected, unquarantined agent
that meets the job's requirements offers more. If the biggest machine around has already failed,
the retry goes to whoever asks, and the job's retry budget ends the story. A successful attempt
forgets the task.

:class:`MemoryHint` is also a :class:`~hub.protocols.Holdback`, so every policy gets the rule without
knowing about it: for one lease request the board takes the tasks an asking agent would fail again
out of the queues the policy sees, and puts them back at the front afterwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.errors import FailureClass
from jobs.requirements import Capabilities, Requirements, unmet

if TYPE_CHECKING:
    from hub.fleet import AgentState, Fleet
    from hub.protocols import DispatchView
    from hub.records import JobRow, TaskRow

__all__ = ["MemoryHint", "memory_offered"]

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
    """Remembers where tasks ran out of memory; ``fleet`` supplies agent capabilities and who is around."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.tasks: OrderedDict[str, _Oom] = OrderedDict()

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        if ok:
            self.tasks.pop(task.id, None)
            return
        if failure != FailureClass.OOM.value:
            return
        agent = self.fleet.agents.get(agent_id)
        if agent is None:
            return
        req = Requirements.from_dict(job.requires)
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
        for other in self.fleet.connected(self.fleet.clock()):
            if other.refused is None and not unmet(entry.req, entry.kind, other.caps) \
                    and not self._no_better(entry, other.caps):
                return True
        return False

    def held_back(self, agent: AgentState, view: DispatchView) -> Iterable[str]:
        """The :class:`~hub.protocols.Holdback`: queued tasks that ran out of memory on agents no smaller."""
        if not self.tasks:
            return ()
        return [task_id for task_id in self.tasks
                if view.queues.is_queued(task_id) and self.needs_more_memory(task_id, agent.caps)]

    @staticmethod
    def _no_better(entry: _Oom, caps: Capabilities) -> bool:
        device, amount = memory_offered(entry.req, caps)
        failed = entry.failed_at.get(device)
        return failed is not None and amount <= failed
