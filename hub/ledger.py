"""The result ledger: which results a board has accepted, held or refused, exactly once each.

A result arrives signed by the agent that ran the attempt. The ledger verifies it, recognises a
re-send (the same digest: idempotent, answered "duplicate") and a conflict (another answer for a
settled task, a lease that expired), and puts every ok result before the board's
:class:`~hub.protocols.ResultValidator`: accept (the task's answer), reject (the attempt failed),
or pending (held in memory until more replicas of the task arrive; judged again each time another
ok result of its job comes in). :class:`AcceptAll`, the default, accepts every ok result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hub.fleet import AgentState
from hub.protocols import ACCEPT, Decision, ResultValidator, Verdict
from hub.queues import JobQueues
from hub.records import JobRow, ResultRow, TaskRow, TaskState
from hub.store import Store
from jobs.errors import FailureClass
from jobs.protocol_results import Outcome, ResultItem, ResultOutcome, UnreadableResult
from security.errors import BadRequest, Conflict, Forbidden, PanalError, Unavailable
from security.records import SignedRecord, decode

__all__ = ["AcceptAll", "Receipt", "ResultLedger", "Staged"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receipt:
    """A verified result as its agent signed it."""

    task_id: str
    lease_id: str
    ok: bool
    digest: str                 # sha256 of the signed payload: what "the same result" means
    record: dict[str, Any]      # the signed record, as on the wire
    payload: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.payload.get("metrics")
        return metrics if isinstance(metrics, dict) else {}

    @property
    def failure(self) -> FailureClass:
        try:
            return FailureClass(self.payload.get("error_class", "error"))
        except ValueError:
            return FailureClass.ERROR

    @property
    def error(self) -> str:
        return str(self.payload.get("error", "failed"))[:2000]


class AcceptAll:
    """The pass-through validator: every ok result is its task's answer."""

    def judge(self, job: JobRow, task: TaskRow, result: ResultRow) -> Verdict:
        return ACCEPT


#: a verdict on a result: its task, the result as received and as it would be stored
Decided = tuple[TaskRow, Receipt, ResultRow, Verdict]
#: tasks and results of each job one batch changed, to be stored together
Staged = dict[str, tuple[list[TaskRow], list[ResultRow]]]


class Persist(Protocol):
    """Stores a job's changed tasks and accepted results (and finishes the job when it is done)."""

    async def __call__(self, job_id: str, changed: Sequence[TaskRow], *, results: Sequence[ResultRow]) -> None: ...


@dataclass(frozen=True)
class _Held:
    receipt: Receipt
    result: ResultRow


class ResultLedger:
    """Accepted digests of the active tasks, results held for validation, and commits in flight."""

    def __init__(self, store: Store, queues: JobQueues, validator: ResultValidator, stats: Counter[str],
                 clock: Callable[[], float]) -> None:
        self.store, self.validator, self.stats, self.clock = store, validator, stats, clock
        self._queues = queues
        self._digests: dict[str, str] = {}                      # task id -> accepted result digest
        self._held: dict[str, _Held] = {}                       # task id -> result awaiting a verdict
        self._in_flight: dict[str, asyncio.Future[None]] = {}   # task id -> its accepted result's commit

    # -- receiving ----------------------------------------------------------------------------------
    def receive(self, agent: AgentState, item: ResultItem) -> Receipt:
        """Verify a signed result of the calling agent (raises on a bad one)."""
        if isinstance(item, UnreadableResult):
            raise item.error
        record = item
        if record.key.id != agent.row.id:
            raise Forbidden(f"result is signed by {record.key.id}, not by the calling agent",
                            code="signer_mismatch")
        payload = record.verify()
        task_id, lease_id, status = payload.get("task_id"), payload.get("lease_id"), payload.get("status")
        if not isinstance(task_id, str) or not isinstance(lease_id, str) or status not in ("ok", "failed"):
            raise BadRequest("a result needs task_id, lease_id and status ok|failed", code="bad_result")
        return Receipt(task_id, lease_id, status == "ok", hashlib.sha256(record.payload).hexdigest(),
                       record.to_wire(), payload)

    async def lookup(self, agent: AgentState, receipt: Receipt) -> ResultOutcome | TaskRow:
        """The outcome of a result seen before, or the live task the agent's lease covers (raises on
        a conflict: a different answer for a settled task, an expired lease, someone else's lease)."""
        task_id = receipt.task_id
        held = self._held.get(task_id)
        if held is not None:
            if held.receipt.digest == receipt.digest:
                self.stats["results_duplicate"] += 1
                return ResultOutcome(task_id, Outcome.PENDING)
            raise Conflict(f"task {task_id} already has a result awaiting validation", code="task_settled")
        task = self._queues.task(task_id)
        if task is None:
            return await self._settled_in_store(receipt)
        if task.state.terminal:
            if self._digests.get(task_id) == receipt.digest:
                self.stats["results_duplicate"] += 1
                return ResultOutcome(task_id, Outcome.DUPLICATE)
            raise Conflict(f"task {task_id} is already {task.state.value}", code="task_settled")
        if task.state != TaskState.LEASED or task.lease_id != receipt.lease_id:
            raise Conflict(f"lease {receipt.lease_id} on task {task_id} has expired; the task was requeued",
                           code="lease_expired")
        if task.agent_id != agent.row.id:
            raise Forbidden(f"task {task_id} is leased to another agent", code="not_your_lease")
        signed = receipt.payload.get("params")   # what the agent says it ran (agents of older versions: absent)
        if signed is not None and (signed != task.params or receipt.payload.get("unit") != task.unit_idx):
            raise BadRequest(f"the result of task {task_id} names other params or another unit than the task's: "
                             "a value must come with the params that produced it", code="wrong_params")
        return task

    async def _settled_in_store(self, receipt: Receipt) -> ResultOutcome:
        """A result for a task of a finished job: compare with what the store accepted."""
        stored = {r.task_id: r.digest for r in await self.store.get_results(receipt.task_id.partition(".")[0])}
        if stored.get(receipt.task_id) == receipt.digest:
            self.stats["results_duplicate"] += 1
            return ResultOutcome(receipt.task_id, Outcome.DUPLICATE)
        raise Conflict(f"task {receipt.task_id} is not active on this board (finished, cancelled or unknown)",
                       code="task_not_active")

    def refused(self, item: ResultItem, error: PanalError) -> ResultOutcome:
        self.stats["results_rejected"] += 1
        return ResultOutcome(_task_id_of(item), Outcome.REJECTED, error)

    def failed(self, task: TaskRow) -> ResultOutcome:
        """The agent reports a failed attempt: settled (the board retries or fails the task)."""
        self.stats["results_failed"] += 1
        return ResultOutcome(task.id, Outcome.ACCEPTED)

    # -- validating ---------------------------------------------------------------------------------
    def judge(self, job: JobRow, task: TaskRow, receipt: Receipt) -> list[Decided]:
        """The validator's verdict on an ok result (a pending one is held here), then on the job's other
        held results, which this one may have decided: the result's own decision first, then those."""
        assert task.agent_id is not None
        result = ResultRow(task.id, task.job_id, task.attempt, task.agent_id, receipt.record, receipt.digest,
                           self.clock())
        verdict = self.validator.judge(job, task, result)
        if verdict.decision == Decision.PENDING:
            self._held[task.id] = _Held(receipt, result)
        decided = [(task, receipt, result, verdict)]
        for task_id, held in list(self._held.items()) if self._held else ():
            other = self._queues.task(task_id)
            if task_id == task.id or other is None or other.job_id != job.id:
                continue
            verdict = self.validator.judge(job, other, held.result)
            if verdict.decision != Decision.PENDING:
                del self._held[task_id]
                decided.append((other, held.receipt, held.result, verdict))
        return decided

    def accept(self, result: ResultRow) -> ResultOutcome:
        """Record an accepted result; a re-send waits on its commit (``committed``) before it is answered."""
        self._digests[result.task_id] = result.digest
        self._in_flight[result.task_id] = asyncio.get_running_loop().create_future()
        self.stats["results_accepted"] += 1
        return ResultOutcome(result.task_id, Outcome.ACCEPTED)

    def disqualified(self, result: ResultRow, verdict: Verdict) -> ResultOutcome:
        """An ok result outvoted by its unit's quorum: stored (as evidence) but not the answer."""
        self._digests[result.task_id] = result.digest
        self._in_flight[result.task_id] = asyncio.get_running_loop().create_future()
        return self.invalid(self._queues.task(result.task_id) or _stub(result), verdict)

    def invalid(self, task: TaskRow, verdict: Verdict) -> ResultOutcome:
        self.stats["results_rejected"] += 1
        return ResultOutcome(task.id, Outcome.REJECTED,
                             Conflict(f"the result of task {task.id} was rejected: {verdict.reason}",
                                      code="result_invalid"))

    def in_flight(self, outcome: ResultOutcome) -> list[asyncio.Future[None]]:
        """The commit a duplicate must wait for (its original may not be stored yet), if any."""
        commit = self._in_flight.get(outcome.task_id) if outcome.status == Outcome.DUPLICATE else None
        return [commit] if commit is not None else []

    async def commit(self, staged: Staged, persist: Persist) -> None:
        """Store what one batch of results changed, job by job; then answer the re-sends waiting on it."""
        accepted = [result for _, results in staged.values() for result in results]
        try:
            for job_id, (tasks, results) in staged.items():
                await persist(job_id, tasks, results=results)
        except Exception as exc:
            log.exception("storing results failed")
            for result in accepted:
                future = self._in_flight.pop(result.task_id)
                future.set_exception(Unavailable("store failure"))
                future.exception()  # retrieved here: only concurrent duplicates await it
            raise Unavailable("the board could not store the results; retry later") from exc
        for result in accepted:
            self._in_flight.pop(result.task_id).set_result(None)

    def forget(self, job: JobRow) -> None:
        """The job finished: its results live in the store now."""
        for i in range(job.n_tasks):
            self._digests.pop(f"{job.id}.{i}", None)
            self._held.pop(f"{job.id}.{i}", None)


def _stub(result: ResultRow) -> TaskRow:
    return TaskRow(result.task_id, result.job_id, -1, {})


def _task_id_of(item: ResultItem) -> str:
    if not isinstance(item, SignedRecord):
        return "?"
    try:
        value = decode(item.payload)
    except PanalError:
        return "?"
    return str(value.get("task_id", "?")) if isinstance(value, dict) else "?"
