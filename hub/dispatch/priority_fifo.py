"""``priority-fifo``: highest priority first, then the oldest job; the simplest fair-enough rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.records import TaskState
from jobs.requirements import unmet

if TYPE_CHECKING:
    from hub.board import AgentState, Board
    from hub.records import TaskRow


class PriorityFifo:
    name = "priority-fifo"

    def pick(self, board: Board, agent: AgentState, slots: int) -> list[TaskRow]:
        picked: list[TaskRow] = []
        for _, _, job_id in board.order:
            queue = board.ready[job_id]
            if not queue:
                continue
            job = board.jobs[job_id]
            if unmet(board.requirements[job_id], job.kind, agent.caps):
                continue
            while queue and len(picked) < slots:
                task = board.tasks[queue.popleft()]
                if task.state == TaskState.QUEUED:
                    picked.append(task)
            if len(picked) >= slots:
                break
        return picked
