"""The board: live scheduling state in memory, written through to the store before any ack.

A board holds the queued tasks of active jobs, the leases handed out to agents, and the waiters of
long-poll lease requests. Every state change a client could rely on (a job accepted, a lease
granted, a result accepted) is committed to the store before the call returns, so a ``kill -9``
loses nothing that was acknowledged. Heartbeats only extend leases in memory: after a restart each
lease gets one fresh TTL, which is as good as a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hub.blobs import BlobStore
from hub.config import HubConfig
from hub.dispatch import BoardObserver, DispatchPolicy, LeaseGate, make_policy
from hub.dispatch.explain import explain_waiting
from hub.dispatch.memory_hint import MemoryAware, MemoryHint
from hub.quarantine import Quarantine
from hub.records import AgentRow, JobRow, JobState, ResultRow, TaskRow, TaskState
from hub.store import Store
from jobs.errors import FailureClass
from jobs.manifest import Manifest
from jobs.requirements import Capabilities, Requirements
from security.errors import BadRequest, Conflict, Forbidden, NotFound, PanalError, Unavailable
from security.identity import PublicKey
from security.records import SignedRecord, decode

__all__ = ["AgentState", "Board", "ResultOutcome"]

log = logging.getLogger(__name__)
Event = dict[str, Any]


@dataclass
class AgentState:
    """A registered agent as the board sees it now."""

    row: AgentRow
    key: PublicKey
    caps: Capabilities
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    done: int = 0
    failed: int = 0
    refused: str | None = None          # why a lease gate currently gives it no work


@dataclass(frozen=True)
class ResultOutcome:
    task_id: str
    status: str                 # accepted | duplicate | rejected
    error: PanalError | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "status": self.status}
        if self.error is not None:
            out.update(self.error.to_body())
        return out


class Board:
    """Jobs, tasks, leases and results of one board."""

    def __init__(self, store: Store, config: HubConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.agents: dict[str, AgentState] = {}
        self.jobs: dict[str, JobRow] = {}                  # active jobs only
        self.tasks: dict[str, TaskRow] = {}                # tasks of active jobs
        self.counts: dict[str, Counter[TaskState]] = {}
        self.requirements: dict[str, Requirements] = {}
        self.ready: dict[str, deque[str]] = {}             # job id -> queued task ids
        self.order: list[tuple[int, float, str]] = []      # (-priority, created, job id), sorted
        self.delayed: list[tuple[float, str]] = []         # (ready at, task id): retry backoff
        self.expiry: list[tuple[float, str, str]] = []     # (expires at, task id, lease id)
        self.digests: dict[str, str] = {}                  # task id -> accepted result digest
        self.stats: Counter[str] = Counter()
        self.listeners: list[Callable[[Event], None]] = []
        self.policy: DispatchPolicy = make_policy(config.dispatch_policy)
        self.observers: list[BoardObserver] = []
        self.gates: list[LeaseGate] = []
        if hasattr(self.policy, "attempt_settled"):  # policies that learn from observed speeds
            self.observers.append(self.policy)  # type: ignore[arg-type]
        # Black-hole detection (a gate and an observer), and OOM retries that go to a bigger machine.
        self.quarantine = Quarantine(config, clock)
        self.observers.append(self.quarantine)
        self.gates.append(self.quarantine)
        self.memory_hint = MemoryHint(self)
        self.observers.append(self.memory_hint)
        self.policy = MemoryAware(self.policy, self.memory_hint)
        self._wakeup = asyncio.Event()
        self._finished: dict[str, asyncio.Event] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.leasing = True
        self.blobs: BlobStore | None = None

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        now = self.clock()
        for row in await self.store.list_agents():
            self.agents[row.id] = AgentState(row, PublicKey.parse(row.public_key),
                                             Capabilities.from_dict(row.capabilities), row.last_seen)
        jobs, tasks = await self.store.load_active()
        for job in jobs:
            self._add_job(job)
        for task in tasks:
            self.tasks[task.id] = task
            self.counts[task.job_id][task.state] += 1
            if task.state == TaskState.QUEUED:
                self.ready[task.job_id].append(task.id)
            elif task.state == TaskState.LEASED and task.lease_id:
                # The outage may have outlived the lease: give the agent one TTL to come back.
                task.lease_expires_at = max(task.lease_expires_at or 0.0, now + self.config.lease_ttl_s)
                heapq.heappush(self.expiry, (task.lease_expires_at, task.id, task.lease_id))
                if task.agent_id in self.agents:
                    self.agents[task.agent_id].running.add(task.id)
        for job in jobs:
            await self._maybe_finish(job.id, [])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="panal-lease-sweeper")
        log.info("board started: %d active jobs, %d tasks, %d agents", len(jobs), len(tasks), len(self.agents))

    async def stop(self) -> None:
        self.leasing = False
        self._wake()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.store.close()

    def _emit(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "at": self.clock(), **data}
        for listener in list(self.listeners):
            listener(event)

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    # -- agents ---------------------------------------------------------------------------------
    async def register_agent(self, key: PublicKey, name: str, capabilities: dict[str, Any]) -> AgentState:
        try:
            caps = Capabilities.from_dict(capabilities)
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadRequest(f"malformed capability report: {exc}", code="bad_capabilities") from exc
        now = self.clock()
        known = self.agents.get(key.id)
        row = AgentRow(key.id, key.text(), name[:64] or key.id[:12], dict(capabilities),
                       known.row.registered_at if known else now, now)
        await self.store.upsert_agent(row)
        if known:
            known.row, known.caps, known.last_seen = row, caps, now
            state = known
        else:
            state = self.agents[key.id] = AgentState(row, key, caps, now)
            self._emit("agent_joined", agent=key.id, name=row.name)
        return state

    def agent(self, agent_id: str) -> AgentState:
        state = self.agents.get(agent_id)
        if state is None:
            raise Forbidden(f"agent {agent_id} is not registered on this board", code="not_registered")
        state.last_seen = self.clock()
        return state

    # -- jobs -----------------------------------------------------------------------------------
    async def submit(self, envelope: Any, signer_id: str) -> tuple[JobRow, bool]:
        """Create a job from a submitter-signed envelope; idempotent on the same envelope."""
        record = SignedRecord.from_wire(envelope)
        if record.key.id != signer_id:
            raise Forbidden(f"manifest is signed by {record.key.id}, request by {signer_id}",
                            code="signer_mismatch")
        payload = record.verify()
        job_id = "j" + hashlib.sha256(record.sig).hexdigest()[:20]
        existing = self.jobs.get(job_id) or await self.store.get_job(job_id)
        if existing is not None:
            return existing, False
        manifest = Manifest.from_dict(payload.get("manifest"), max_tasks=self.config.max_tasks_per_job)
        self._check_blobs(manifest)
        now = self.clock()
        job = JobRow(id=job_id, name=manifest.name, submitter_id=signer_id, kind=manifest.kind,
                     priority=manifest.priority, state=JobState.QUEUED, created_at=now,
                     n_tasks=manifest.n_tasks, envelope=record.to_wire(),
                     requires=manifest.requires.to_dict(), timeout_s=manifest.timeout_s,
                     max_attempts=manifest.retries + 1,
                     deadline_at=now + manifest.deadline_s if manifest.deadline_s else None,
                     labels=manifest.labels)
        tasks = [TaskRow(id=f"{job_id}.{i}", job_id=job_id, idx=i, params=params, updated_at=now)
                 for i, params in enumerate(manifest.points())]
        await self.store.create_job(job, tasks)
        if job_id in self.jobs:  # a concurrent identical submission won the race
            return self.jobs[job_id], False
        self._add_job(job)
        for task in tasks:
            self.tasks[task.id] = task
            self.ready[job_id].append(task.id)
        self.counts[job_id][TaskState.QUEUED] = len(tasks)
        self._emit("job_submitted", job=job_id, name=job.name, tasks=len(tasks))
        self._wake()
        return job, True

    def _check_blobs(self, manifest: Manifest) -> None:
        """Inputs are uploaded before the manifest: a job never exists with a missing input."""
        for ref in manifest.inputs.values():
            if ref.path is not None:
                raise BadRequest(f"spec.inputs.{ref.name}: a local path reached the board; submit with "
                                 "`panal submit`, which uploads inputs first", code="input_not_uploaded")
            if self.blobs is not None and ref.blob is not None and not self.blobs.exists(ref.blob):
                raise BadRequest(f"spec.inputs.{ref.name}: blob {ref.blob} is not on this board; upload it "
                                 "first (PUT /v1/blobs/{sha256})", code="missing_blob")

    def _add_job(self, job: JobRow) -> None:
        self.jobs[job.id] = job
        self.counts[job.id] = Counter()
        self.requirements[job.id] = Requirements.from_dict(job.requires)
        self.ready[job.id] = deque()
        self._finished.setdefault(job.id, asyncio.Event())
        self.order.append((-job.priority, job.created_at, job.id))
        self.order.sort()

    def _drop_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        self.requirements.pop(job_id, None)
        self.ready.pop(job_id, None)
        self.counts.pop(job_id, None)
        self.order = [entry for entry in self.order if entry[2] != job_id]
        for i in range(job.n_tasks):
            self.tasks.pop(f"{job_id}.{i}", None)
            self.digests.pop(f"{job_id}.{i}", None)

    async def cancel(self, job_id: str, requester: str) -> JobRow:
        job = self.jobs.get(job_id)
        if job is None:
            stored = await self.store.get_job(job_id)
            if stored is None:
                raise NotFound(f"no job {job_id}", code="no_such_job")
            return stored  # already finished: cancelling is a no-op
        if job.submitter_id != requester:
            raise Forbidden(f"job {job_id} belongs to {job.submitter_id}", code="not_owner")
        now = self.clock()
        changed = []
        for task in self._job_tasks(job_id):
            if not task.state.terminal:
                self._set_state(task, TaskState.CANCELLED)
                task.error, task.updated_at = "cancelled by submitter", now
                changed.append(task)
        self.ready[job_id].clear()
        await self._maybe_finish(job_id, changed, cancelled=True)
        return job

    def _job_tasks(self, job_id: str) -> list[TaskRow]:
        job = self.jobs[job_id]
        return [self.tasks[f"{job_id}.{i}"] for i in range(job.n_tasks)]

    def _set_state(self, task: TaskRow, state: TaskState) -> None:
        counts = self.counts[task.job_id]
        counts[task.state] -= 1
        counts[state] += 1
        if task.state == TaskState.LEASED and task.agent_id in self.agents:
            self.agents[task.agent_id].running.discard(task.id)
        task.state = state

    async def _maybe_finish(self, job_id: str, changed: Sequence[TaskRow], cancelled: bool = False,
                            results: Sequence[ResultRow] = ()) -> None:
        """Persist ``changed`` tasks (and results), finishing the job if every task is terminal."""
        job = self.jobs.get(job_id)
        if job is None or job.state.terminal:  # finished by a concurrent call: just persist
            if results:
                await self.store.accept_results(results, changed, [])
            elif changed:
                await self.store.save_tasks(changed)
            return
        counts = self.counts[job_id]
        terminal = counts[TaskState.DONE] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
        jobs: list[JobRow] = []
        finishing = cancelled or terminal >= job.n_tasks   # this call ends the job (set before any await)
        if finishing:
            if cancelled:
                job.state = JobState.CANCELLED
            elif counts[TaskState.FAILED]:
                job.state = JobState.FAILED
                failed = next(t for t in self._job_tasks(job_id) if t.state == TaskState.FAILED)
                job.error = f"{counts[TaskState.FAILED]} of {job.n_tasks} tasks failed; " \
                            f"first: task {failed.idx}: {failed.error}"
            else:
                job.state = JobState.SUCCEEDED
            job.finished_at = self.clock()
            jobs.append(job)
        elif job.state == JobState.QUEUED and counts[TaskState.LEASED] + counts[TaskState.DONE]:
            job.state = JobState.RUNNING
            jobs.append(job)
        if results:
            await self.store.accept_results(results, changed, jobs)
        elif changed or jobs:
            await self.store.save_tasks(changed, jobs)
        if finishing:
            self._drop_job(job_id)
            self._finished[job_id].set()
            self._emit("job_finished", job=job_id, name=job.name, state=job.state.value)

    async def wait_job(self, job_id: str, timeout_s: float) -> None:
        event = self._finished.get(job_id)
        if event is None or timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    # -- leases ---------------------------------------------------------------------------------
    async def lease(self, agent_id: str, slots: int, wait_s: float) -> list[dict[str, Any]]:
        """Hand out up to ``slots`` tasks, long-polling up to ``wait_s`` for the first one."""
        agent = self.agent(agent_id)
        slots = max(0, min(slots, self.config.max_tasks_per_lease))
        deadline = time.monotonic() + min(max(wait_s, 0.0), self.config.max_poll_wait_s)
        while True:
            if not self.leasing or slots == 0:
                return []
            refusal = next((r for g in self.gates if (r := g.refuse(agent))), None)
            if refusal:
                agent.refused = refusal
                return []
            agent.refused = None
            picked = self.policy.pick(self, agent, slots)
            if picked:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return []
            agent.last_seen = self.clock()
        now = self.clock()
        expires = now + self.config.lease_ttl_s
        writes = []
        for task in picked:
            self._set_state(task, TaskState.LEASED)
            task.lease_id, task.agent_id, task.lease_expires_at, task.updated_at = (
                secrets.token_hex(8), agent_id, expires, now)
            agent.running.add(task.id)
            writes.append((task.id, task.lease_id, agent_id, task.attempt, expires))
        try:
            await self.store.save_leases(writes)
        except Exception:
            for task in picked:  # nothing was acknowledged: put them back as they were
                self._set_state(task, TaskState.QUEUED)
                task.lease_id = task.agent_id = task.lease_expires_at = None
                self.ready[task.job_id].appendleft(task.id)
            raise
        for task in picked:
            assert task.lease_id is not None
            heapq.heappush(self.expiry, (expires, task.id, task.lease_id))
            job = self.jobs[task.job_id]
            if job.state == JobState.QUEUED:
                job.state = JobState.RUNNING
                await self.store.save_tasks([], [job])
        self.stats["leases"] += len(picked)
        return [self._assignment(task) for task in picked]

    def _assignment(self, task: TaskRow) -> dict[str, Any]:
        job = self.jobs[task.job_id]
        return {"task_id": task.id, "job_id": job.id, "idx": task.idx, "lease_id": task.lease_id,
                "attempt": task.attempt, "kind": job.kind, "params": task.params,
                "timeout_s": job.timeout_s, "lease_ttl_s": self.config.lease_ttl_s,
                "envelope": job.envelope, "checkpoint": task.checkpoint}

    async def heartbeat(self, agent_id: str, leases: Sequence[Any]) -> dict[str, Any]:
        """Extend the caller's leases; report the ones it no longer holds so it can stop them."""
        self.agent(agent_id)
        expires = self.clock() + self.config.lease_ttl_s
        lost = []
        checkpoints: list[TaskRow] = []
        for item in leases:
            if not isinstance(item, dict) or not isinstance(item.get("task_id"), str):
                raise BadRequest("heartbeat leases must be maps with task_id and lease_id")
            task = self.tasks.get(item["task_id"])
            if task is None or task.state != TaskState.LEASED or task.lease_id != item.get("lease_id") \
                    or task.agent_id != agent_id:
                reason = "cancelled" if task is not None and task.state == TaskState.CANCELLED else "lost"
                lost.append({"task_id": item["task_id"], "reason": reason})
                continue
            progress = item.get("progress")
            if isinstance(progress, int | float):
                task.progress = min(max(float(progress), 0.0), 1.0)
            checkpoint = item.get("checkpoint")
            if isinstance(checkpoint, str) and checkpoint != task.checkpoint and \
                    (self.blobs is None or self.blobs.exists(checkpoint)):
                task.checkpoint = checkpoint
                checkpoints.append(task)
            task.lease_expires_at = expires
            assert task.lease_id is not None
            heapq.heappush(self.expiry, (expires, task.id, task.lease_id))
        if checkpoints:  # a checkpoint is worth a commit: it is what a retry resumes from
            await self.store.save_tasks(checkpoints)
        return {"lease_ttl_s": self.config.lease_ttl_s, "lost": lost}

    async def release(self, agent_id: str, task_id: str, lease_id: str) -> None:
        """The agent gives a lease back (shutting down): requeue at once, no attempt used."""
        task = self.tasks.get(task_id)
        if task is None or task.state != TaskState.LEASED or task.lease_id != lease_id \
                or task.agent_id != agent_id:
            return
        self._requeue(task, count_attempt=False)
        await self.store.save_tasks([task])
        self._wake()

    def _requeue(self, task: TaskRow, count_attempt: bool, delay_s: float = 0.0) -> None:
        self._set_state(task, TaskState.QUEUED)
        if count_attempt:
            task.attempt += 1
        task.lease_id = task.agent_id = task.lease_expires_at = None
        task.progress, task.updated_at = 0.0, self.clock()
        if delay_s > 0:
            heapq.heappush(self.delayed, (self.clock() + delay_s, task.id))
        else:
            self.ready[task.job_id].append(task.id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.expiry_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("lease sweep failed; will retry")

    async def sweep(self) -> None:
        """Requeue expired leases (attempt + 1) and release retry backoffs that are due."""
        now = self.clock()
        woke = False
        while self.delayed and self.delayed[0][0] <= now:
            _, task_id = heapq.heappop(self.delayed)
            task = self.tasks.get(task_id)
            if task is not None and task.state == TaskState.QUEUED:
                self.ready[task.job_id].append(task_id)
                woke = True
        changed: dict[str, list[TaskRow]] = {}
        self._expire_deadlines(now, changed)
        while self.expiry and self.expiry[0][0] <= now:
            _, task_id, lease_id = heapq.heappop(self.expiry)
            task = self.tasks.get(task_id)
            if task is None or task.state != TaskState.LEASED or task.lease_id != lease_id \
                    or (task.lease_expires_at or 0.0) > now:
                continue  # finished, re-leased, or extended by a heartbeat since
            log.info("lease of task %s on agent %s expired (attempt %d)", task_id, task.agent_id, task.attempt)
            self.stats["expired"] += 1
            self._emit("lease_expired", task=task_id, agent=task.agent_id)
            self._settled(task.agent_id or "?", task, False, FailureClass.AGENT_LOST.value, {})
            self._fail_attempt(task, FailureClass.AGENT_LOST, "the agent stopped heartbeating (lease expired)")
            changed.setdefault(task.job_id, []).append(task)
            woke = True
        for job_id, tasks in changed.items():
            await self._maybe_finish(job_id, tasks)
        if woke:
            self._wake()

    def _expire_deadlines(self, now: float, changed: dict[str, list[TaskRow]]) -> None:
        """Queued tasks of a job past its deadline fail (nobody can run them in time any more)."""
        for job in list(self.jobs.values()):
            if job.deadline_at is None or job.deadline_at > now or not self.ready[job.id]:
                continue
            for task_id in self.ready[job.id]:
                task = self.tasks[task_id]
                if task.state == TaskState.QUEUED:
                    self._set_state(task, TaskState.FAILED)
                    task.error, task.error_class, task.updated_at = "the job's deadline passed before it ran", \
                        "deadline", now
                    changed.setdefault(job.id, []).append(task)
            self.ready[job.id].clear()

    def _fail_attempt(self, task: TaskRow, failure: FailureClass, message: str) -> None:
        """Retry a transient failure while attempts remain; otherwise fail the task."""
        job = self.jobs[task.job_id]
        task.error, task.error_class = message, failure.value
        if failure.transient and task.attempt < job.max_attempts:
            self.stats["retries"] += 1
            self._requeue(task, count_attempt=True,
                          delay_s=self.config.retry_backoff_s * 2 ** (task.attempt - 1)
                          if failure != FailureClass.AGENT_LOST else 0.0)
        else:
            self._set_state(task, TaskState.FAILED)
            task.lease_id = task.lease_expires_at = None
            task.updated_at = self.clock()

    # -- results --------------------------------------------------------------------------------
    async def accept(self, agent_id: str, records: Sequence[Any]) -> list[ResultOutcome]:
        """Accept signed results exactly once; each gets its own outcome."""
        agent = self.agent(agent_id)
        outcomes: list[ResultOutcome] = []
        staged: dict[str, tuple[list[TaskRow], list[ResultRow]]] = {}
        waits: list[asyncio.Future[None]] = []
        mine: list[str] = []
        for wire in records:
            try:
                outcome, task, result = self._check_result(agent, wire)
                if outcome.status == "lookup":
                    outcome = await self._settled_in_store(outcome.task_id, wire)
            except PanalError as exc:
                self.stats["results_rejected"] += 1
                outcomes.append(ResultOutcome(_task_id_of(wire), "rejected", exc))
                continue
            outcomes.append(outcome)
            if outcome.status == "duplicate" and outcome.task_id in self._pending:
                waits.append(self._pending[outcome.task_id])
            if task is not None:
                tasks, results = staged.setdefault(task.job_id, ([], []))
                tasks.append(task)
                if result is not None:
                    results.append(result)
                    self._pending[task.id] = asyncio.get_running_loop().create_future()
                    mine.append(task.id)
        try:
            for job_id, (tasks, results) in staged.items():
                await self._maybe_finish(job_id, tasks, results=results)
        except Exception as exc:
            log.exception("storing results failed")
            for task_id in mine:
                future = self._pending.pop(task_id)
                future.set_exception(Unavailable("store failure"))
                future.exception()  # retrieved here: only concurrent duplicates await it
            raise Unavailable("the board could not store the results; retry later") from exc
        for task_id in mine:
            self._pending.pop(task_id).set_result(None)
        if waits:
            await asyncio.gather(*waits)
        if staged:
            self._wake()
        return outcomes

    def _check_result(self, agent: AgentState, wire: Any) -> tuple[ResultOutcome, TaskRow | None,
                                                                    ResultRow | None]:
        record = SignedRecord.from_wire(wire)
        if record.key.id != agent.row.id:
            raise Forbidden(f"result is signed by {record.key.id}, not by the calling agent",
                            code="signer_mismatch")
        payload = record.verify()
        task_id, lease_id, status = payload.get("task_id"), payload.get("lease_id"), payload.get("status")
        if not isinstance(task_id, str) or not isinstance(lease_id, str) or status not in ("ok", "failed"):
            raise BadRequest("a result needs task_id, lease_id and status ok|failed", code="bad_result")
        digest = hashlib.sha256(record.payload).hexdigest()
        task = self.tasks.get(task_id)
        if task is None or task.state in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED):
            return self._already_settled(task_id, task, digest), None, None
        if task.state != TaskState.LEASED or task.lease_id != lease_id:
            raise Conflict(f"lease {lease_id} on task {task_id} has expired; the task was requeued",
                           code="lease_expired")
        if task.agent_id != agent.row.id:
            raise Forbidden(f"task {task_id} is leased to another agent", code="not_your_lease")
        now = self.clock()
        if status == "ok":
            self._set_state(task, TaskState.DONE)
            task.progress, task.updated_at, task.error, task.error_class = 1.0, now, None, None
            self.digests[task_id] = digest
            agent.done += 1
            self.stats["results_accepted"] += 1
            self._settled(agent.row.id, task, True, None, payload.get("metrics") or {})
            return (ResultOutcome(task_id, "accepted"), task,
                    ResultRow(task_id, task.job_id, task.attempt, agent.row.id, record.to_wire(), digest, now))
        try:
            failure = FailureClass(payload.get("error_class", "error"))
        except ValueError:
            failure = FailureClass.ERROR
        agent.failed += 1
        self.stats["results_failed"] += 1
        self._settled(agent.row.id, task, False, failure.value, payload.get("metrics") or {})
        self._fail_attempt(task, failure, str(payload.get("error", "failed"))[:2000])
        return ResultOutcome(task_id, "accepted"), task, None

    def _settled(self, agent_id: str, task: TaskRow, ok: bool, failure: str | None, metrics: Any) -> None:
        job = self.jobs[task.job_id]
        for observer in self.observers:
            try:
                observer.attempt_settled(agent_id, job, task, ok, failure, metrics if isinstance(metrics, dict) else {})
            except Exception:
                log.exception("board observer %r failed", observer)

    def _already_settled(self, task_id: str, task: TaskRow | None, digest: str) -> ResultOutcome:
        """A result for a task that is already finished: a re-send (duplicate) or a conflict."""
        if task is not None and self.digests.get(task_id) == digest:
            self.stats["results_duplicate"] += 1
            return ResultOutcome(task_id, "duplicate")
        if task is None:
            return ResultOutcome(task_id, "lookup")
        raise Conflict(f"task {task_id} is already {task.state.value}", code="task_settled")

    async def _settled_in_store(self, task_id: str, wire: Any) -> ResultOutcome:
        """A result for a task of a finished job: compare with what the store accepted."""
        digest = hashlib.sha256(SignedRecord.from_wire(wire).payload).hexdigest()
        stored = {r.task_id: r.digest for r in await self.store.get_results(task_id.partition(".")[0])}
        if stored.get(task_id) == digest:
            self.stats["results_duplicate"] += 1
            return ResultOutcome(task_id, "duplicate")
        raise Conflict(f"task {task_id} is not active on this board (finished, cancelled or unknown)",
                       code="task_not_active")

    # -- views ----------------------------------------------------------------------------------
    async def job_view(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id) or await self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", code="no_such_job")
        if job.id in self.jobs:
            counts = {s.value: n for s, n in self.counts[job.id].items() if n}
        else:
            counts = dict(Counter(t.state.value for t in await self.store.get_tasks(job_id)))
        view = job_summary(job, counts)
        if job.id in self.jobs and self.ready[job.id]:
            reasons = explain_waiting(self, job.id)
            if reasons:
                view["waiting_because"] = reasons
        return view

    def online_agents(self) -> list[AgentState]:
        horizon = self.clock() - max(2 * self.config.max_poll_wait_s, self.config.lease_ttl_s) - 5
        return [a for a in self.agents.values() if a.last_seen >= horizon]

    def status(self) -> dict[str, Any]:
        tasks: Counter[str] = Counter()
        for counts in self.counts.values():
            for state, n in counts.items():
                tasks[state.value] += n
        online = self.online_agents()
        return {
            "agents": {"registered": len(self.agents), "online": len(online),
                       "busy": sum(1 for a in online if a.running)},
            "jobs": {"active": len(self.jobs)},
            "tasks": dict(tasks),
            "stats": dict(self.stats),
        }


def job_summary(job: JobRow, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": job.id, "name": job.name, "kind": job.kind, "state": job.state.value,
            "submitter": job.submitter_id, "priority": job.priority, "created_at": job.created_at,
            "finished_at": job.finished_at, "n_tasks": job.n_tasks, "tasks": counts, "error": job.error,
            "labels": job.labels}


def _task_id_of(wire: Any) -> str:
    try:
        value = decode(SignedRecord.from_wire(wire).payload)
        return str(value.get("task_id", "?")) if isinstance(value, dict) else "?"
    except PanalError:
        return "?"
