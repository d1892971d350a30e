"""What the end of an attempt does to its task: a result judged and applied, a failure retried or
failed, observers told.

The board receives results and commits what changed (:meth:`hub.board.Board.accept`); this part
decides the change, in memory, for one verified result at a time: a failure report goes to the
retries (a submitter fault first to its confirmation, hub/submitter_faults.py); an ok result goes
through the ledger's validator, and the verdict is carried out: accepted (done), pending (held for
its unit's other instances), invalid (outvoted: kept as evidence, no credit), failed as
``no_consensus``, or rejected (the attempt failed). Every settled attempt is told to the board's
observers (policies, quarantine, the status feed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from hub.best import BestTasks
from hub.config import HubConfig
from hub.fleet import AgentState, Fleet
from hub.leases import LeaseTable
from hub.ledger import Receipt, ResultLedger, Staged
from hub.protocols import BoardObserver, Decision, Verdict
from hub.queues import JobQueues
from hub.records import ResultRow, TaskRow, TaskState
from hub.retries import Retries
from hub.submitter_faults import SubmitterFaults, is_submitter_fault
from hub.trust.trust import Trust
from jobs.errors import FailureClass
from jobs.protocol_results import Outcome, ResultOutcome
from security.errors import PayloadTooLarge

__all__ = ["Settlement"]

log = logging.getLogger(__name__)


class Settlement:
    """Applies the end of an attempt to its task (in memory; the board commits what changed)."""

    def __init__(self, config: HubConfig, clock: Callable[[], float], queues: JobQueues, leases: LeaseTable,
                 ledger: ResultLedger, retries: Retries, trust: Trust, submitter_faults: SubmitterFaults,
                 fleet: Fleet, observers: list[BoardObserver], best: BestTasks | None = None) -> None:
        self.config, self.clock = config, clock
        self._queues, self._leases, self._ledger, self._retries = queues, leases, ledger, retries
        self.trust, self.submitter_faults = trust, submitter_faults
        self._fleet = fleet
        self._observers = observers   # the board's list: observers added later are heard too
        self.best = best or BestTasks()   # a job's best task by its spec.report metric (accepted results only)

    @property
    def agents(self) -> Mapping[str, AgentState]:
        return self._fleet.agents

    def oversized(self, receipt: Receipt) -> PayloadTooLarge | None:
        """A result record past ``max_result_bytes`` (outputs belong in blobs): refused, and the attempt
        fails (retried elsewhere), so an honest agent is not left holding a lease it cannot settle."""
        size = len(receipt.record.get("payload") or b"")
        if size <= self.config.max_result_bytes:
            return None
        return PayloadTooLarge(f"the result record of task {receipt.task_id} is {size} bytes; this hub accepts "
                               f"at most {self.config.max_result_bytes} (max_result_bytes): outputs go through "
                               "blobs", code="result_too_large")

    def settle(self, agent: AgentState, task: TaskRow, receipt: Receipt, staged: Staged) -> ResultOutcome:
        """Apply a result for a task the agent holds: a failure report, or the validator's verdict."""
        if not receipt.ok:
            self.fail(task, agent.row.id, receipt.failure, receipt.error, receipt.metrics, staged)
            return self._ledger.failed(task)
        mine, *others = self._ledger.judge(self._queues.job(task.job_id), task, receipt)
        outcome = self._apply(*mine, staged)
        for held in others:   # held results of the job that this one decided
            self._apply(*held, staged)
        now = self.clock()
        for task_id in self.trust.take_cancels():   # instances its unit no longer needs
            other = self._queues.task(task_id)
            if other is not None and not other.state.terminal:
                self._leases.set_state(other, TaskState.CANCELLED)
                other.error, other.updated_at = "not needed: its unit was validated by other instances", now
                staged.setdefault(other.job_id, ([], []))[0].append(other)
        return outcome

    def _apply(self, task: TaskRow, receipt: Receipt, result: ResultRow, verdict: Verdict,
               staged: Staged) -> ResultOutcome:
        """Carry out the validator's verdict on an ok result."""
        if verdict.decision == Decision.PENDING:
            self._leases.settle(task)   # the agent is free; the task waits for its replicas
            return ResultOutcome(task.id, Outcome.PENDING)
        if verdict.decision in (Decision.INVALID, Decision.FAIL):
            return self._disqualify(task, receipt, result, verdict, staged)
        if verdict.decision == Decision.REJECT:
            self.fail(task, result.agent_id, FailureClass.ERROR, f"the result was rejected: {verdict.reason}",
                       receipt.metrics, staged)
            return self._ledger.invalid(task, verdict)
        self._leases.set_state(task, TaskState.DONE)
        task.progress, task.updated_at, task.error, task.error_class = 1.0, self.clock(), None, None
        agent = self.agents.get(result.agent_id)
        if agent is not None:
            agent.done += 1
        tasks, results = staged.setdefault(task.job_id, ([], []))
        tasks.append(task)
        results.append(result)
        self.best.offer(self._queues.job(task.job_id), task, receipt.payload)
        outcome = self._ledger.accept(result)
        self.settled(result.agent_id, task, True, None, receipt.metrics)
        return outcome

    def _disqualify(self, task: TaskRow, receipt: Receipt, result: ResultRow, verdict: Verdict,
                    staged: Staged) -> ResultOutcome:
        """An instance the quorum outvoted (invalid: its signed result is kept as evidence, no credit) or
        of a unit without consensus (the task fails, not retried: more attempts would not agree either)."""
        tasks, results = staged.setdefault(task.job_id, ([], []))
        tasks.append(task)
        now = self.clock()
        if verdict.decision == Decision.INVALID:
            self._leases.set_state(task, TaskState.INVALID)
            task.error, task.error_class, task.updated_at = f"invalid: {verdict.reason}"[:2000], "invalid", now
            results.append(result)
            self.settled(result.agent_id, task, False, "invalid", receipt.metrics)
            return self._ledger.disqualified(result, verdict)
        self._leases.set_state(task, TaskState.FAILED)
        task.error, task.error_class, task.updated_at = verdict.reason[:2000], "no_consensus", now
        return self._ledger.invalid(task, verdict)

    def fail(self, task: TaskRow, agent_id: str, failure: FailureClass, message: str, metrics: dict[str, Any],
              staged: Staged) -> None:
        """The agent's attempt gave no answer: observers hear it, then the task is retried or fails."""
        agent = self.agents.get(agent_id)
        self.settled(agent_id, task, False, failure.value, metrics)
        staged.setdefault(task.job_id, ([], []))[0].append(task)
        if is_submitter_fault(failure):   # the work's fault, if true: never the volunteer's error rate
            if self.submitter_faults.intercept(task, agent_id, failure, message, self._retries):
                return
        elif agent is not None:
            agent.failed += 1
        self._retries.fail_attempt(task, failure, message)

    def settled(self, agent_id: str, task: TaskRow, ok: bool, failure: str | None, metrics: dict[str, Any]) -> None:
        job = self._queues.job(task.job_id)
        for observer in self._observers:
            try:
                observer.attempt_settled(agent_id, job, task, ok, failure, metrics)
            except Exception:
                log.exception("board observer %r failed", observer)
