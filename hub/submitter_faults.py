"""Failures classified by who caused them: a submitter's fault needs a second opinion.

``invalid_params`` and ``unsupported`` say the *work* can never succeed (bad parameters, a refused
model or input): the job's fault, not the volunteer's. Taken at one agent's word, one lying volunteer
could sink any job (fail a task at once, and with it the job) while its honest peers never saw it.
So a task fails as a submitter fault only once ``submitter_fault_confirmations`` *different* agents
reported one (or when no connected agent that has not reported it could run it: a one-agent board
would otherwise wait forever); until then it is requeued (no attempt used: the report says nothing about the work's
luck) and held back from every agent that already reported it, so only a fresh agent can take it.
An honest agent that then runs it settles it; a second report confirms the fault and the task fails
with the submitter's error.

An attempt that resumed from a checkpoint and failed this way blames the checkpoint, not the job (a
lessee that signed a garbage checkpoint must not turn every resumer into a witness against the
submitter); but one agent's word does not wipe another's progress either: the checkpoint is dropped
(and the task starts afresh) only once a second agent also failed from it, or no other could try.

Such reports never count against the reporting agent (black-hole detection ignores them and the
public error rate counts them apart); an agent that lies this way only delays a task by one lease.
The reports live in memory: after a hub restart a task needs fresh reports (it can only get slower
to fail, never wrongly fail). Registered on the board as a :class:`~hub.protocols.Holdback`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hub.fleet import AgentState, Fleet
from hub.protocols import DispatchView
from hub.queues import JobQueues
from hub.records import TaskRow
from hub.retries import Retries
from jobs.errors import FailureClass
from jobs.requirements import unmet

__all__ = ["SubmitterFaults", "is_submitter_fault"]


def is_submitter_fault(failure: FailureClass) -> bool:
    """Whether a failure says the work itself can never succeed (the submitter's doing)."""
    return not failure.transient


class SubmitterFaults:
    """Reports of submitter faults per task, and the holdback that keeps a task from its reporters."""

    def __init__(self, confirmations: int, fleet: Fleet, queues: JobQueues, clock: Callable[[], float]) -> None:
        self.confirmations = max(1, confirmations)
        self._fleet, self._queues, self._clock = fleet, queues, clock
        self._reports: dict[str, dict[str, str]] = {}     # task id -> reporting agent -> its message
        self._by_agent: dict[str, set[str]] = {}          # agent id -> tasks it reported

    def report(self, task_id: str, agent_id: str, message: str) -> bool:
        """Note the agent's report; whether the fault is now confirmed (enough different agents)."""
        reports = self._reports.setdefault(task_id, {})
        reports[agent_id] = message
        self._by_agent.setdefault(agent_id, set()).add(task_id)
        return len(reports) >= self.confirmations

    def intercept(self, task: TaskRow, agent_id: str, failure: FailureClass, message: str, retries: Retries) -> bool:
        """Keep an unconfirmed submitter fault from failing the task: requeued (no attempt used) with
        why it waits; False when it is confirmed and the task should fail as reported."""
        if task.checkpoint is not None:   # it resumed: the checkpoint (its writer) is suspect, not the job
            if self.report(task.id, agent_id, message) or not self._others_could_run(task):
                task.checkpoint = task.checkpoint_record = None
                self.forget([task.id])   # the fresh start gets fresh reports
                why = f"attempts resumed from a checkpoint failed ({failure.value}: {message[:500]}); " \
                      "the checkpoint was dropped"
            else:                        # one agent's word must not wipe another's progress
                why = f"agent {agent_id[:12]} reported {failure.value} after resuming from a checkpoint: " \
                      f"{message[:500]}; waiting for another agent to try it"
        elif not self.report(task.id, agent_id, message) and self._others_could_run(task):
            why = f"agent {agent_id[:12]} reported {failure.value}: {message[:500]}; waiting for another agent " \
                  "to confirm it"
        else:
            return False
        retries.requeue(task, count_attempt=False)
        task.error, task.error_class = why, failure.value
        return True

    def _others_could_run(self, task: TaskRow) -> bool:
        """Whether a connected agent that has not reported the task could confirm it. With none (a
        standalone `panal up`, a one-agent board) waiting would hang the job: the report stands."""
        reported = self._reports.get(task.id, {})
        job = self._queues.job(task.job_id)
        req = self._queues.requirements(task.job_id)
        return any(agent.row.id not in reported and not unmet(req, job.kind, agent.caps)
                   for agent in self._fleet.connected(self._clock()))

    def reporters(self, task_id: str) -> list[str]:
        return list(self._reports.get(task_id, {}))

    def forget(self, task_ids: Iterable[str]) -> None:
        """The tasks are settled (or their job finished): drop their reports."""
        for task_id in task_ids:
            for agent_id in self._reports.pop(task_id, {}):
                tasks = self._by_agent.get(agent_id)
                if tasks is not None:
                    tasks.discard(task_id)
                    if not tasks:
                        del self._by_agent[agent_id]

    # -- Holdback -------------------------------------------------------------------------------
    def held_back(self, agent: AgentState, view: DispatchView) -> Iterable[str]:
        """The tasks this agent reported, while another connected agent could still settle them. A hold
        nobody else can lift (the only other capable agent left, e.g. the lessee that signed a garbage
        checkpoint and went away) ends: the reporter runs the task again and its second report stands
        (``intercept``: the checkpoint is dropped, or the fault confirmed), instead of a wait forever."""
        held = self._by_agent.get(agent.row.id)
        if not held:
            return ()
        return [task_id for task_id in held
                if (task := self._queues.task(task_id)) is None or self._others_could_run(task)]
