"""The board: live scheduling state in memory, written through to the store before any ack.

A board holds the queued tasks of active jobs, the leases handed out to agents, and the waiters of
long-poll lease requests. Every state change a client could rely on (a job accepted, a lease
granted, a result accepted) is committed to the store before the call returns, so a ``kill -9``
loses nothing that was acknowledged. Heartbeats only extend leases in memory: after a restart each
lease gets one fresh TTL, which is as good as a heartbeat.

The board wires its parts and owns the job life cycle: :class:`~hub.queues.JobQueues` (what waits,
in what order), :class:`~hub.leases.LeaseTable` (who holds what until when), the
:class:`~hub.ledger.ResultLedger` (which results count) and :class:`~hub.readmodel.BoardView`
(what views read). Plugins (:mod:`hub.protocols`) are registered explicitly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from hub.background import cancel_all, run_every
from hub.best import BestTasks
from hub.blob_backend import BlobBackend
from hub.config import HubConfig
from hub.dispatch import make_policy
from hub.dispatch.memory_hint import MemoryHint
from hub.dispatcher import Dispatcher
from hub.envelopes import JobEnvelope, stored_proofs
from hub.fleet import AgentState, Fleet
from hub.intake import Envelope, new_job
from hub.lease_writes import LeaseWrites
from hub.leases import LeaseTable
from hub.ledger import ResultLedger, Staged
from hub.protocols import (
    BoardObserver,
    DispatchPolicy,
    DispatchTimer,
    EventListener,
    LeaseGate,
    ResultValidator,
)
from hub.quarantine import Quarantine
from hub.queues import JobQueues
from hub.readmodel import BoardView, job_summary
from hub.records import JobRow, JobState, ResultRow, TaskRow, TaskState
from hub.retries import Retries
from hub.settlement import Settlement
from hub.store import Store
from hub.submitter_faults import SubmitterFaults
from hub.trust.trust import Trust
from jobs.errors import FailureClass
from jobs.protocol import Assignment, HeartbeatLease, HeartbeatReply, ResultItem, ResultOutcome
from jobs.requirements import Capabilities
from security.errors import Forbidden, NotFound, PanalError
from security.identity import PublicKey

__all__ = ["AgentState", "Board"]

log = logging.getLogger(__name__)


class Board:
    """Jobs, tasks, leases and results of one board."""

    def __init__(self, store: Store, config: HubConfig, clock: Callable[[], float] = time.time, *,
                 blobs: BlobBackend | None = None, policy: DispatchPolicy | None = None,
                 validator: ResultValidator | None = None) -> None:
        self.store, self.config, self.clock, self.blobs = store, config, clock, blobs
        self._stats: Counter[str] = Counter()
        self.policy = policy or make_policy(config.dispatch_policy)
        self._fleet = Fleet(config, clock)
        self._queues = JobQueues()
        self._leases = LeaseTable(config, clock, self._queues, self._fleet, blobs)
        self._retries = Retries(config, clock, self._queues, self._leases, self._stats)
        # Black-hole detection (a gate and an observer), and OOM retries that wait for a bigger machine.
        self.quarantine = Quarantine(config, clock)
        # Results you can trust: instances, quorum, reputation, credit (the default validator, a holdback).
        self.trust = Trust(config, clock, store, self._queues, lambda: dict(self._fleet.agents), self.quarantine)
        self.trust.speed.on_report = self._fleet.note_report
        self._ledger = ResultLedger(store, self._queues, validator or self.trust, self._stats, clock)
        self._dispatcher = Dispatcher(self.policy, self._queues, self._fleet, self._leases, config, clock)
        self.view = BoardView(store, clock, self._queues, self._fleet, self._stats, self._dispatcher.context,
                              self.policy)
        self._listeners: list[EventListener] = []
        self._observers: list[BoardObserver] = [self.policy]   # a policy may learn from settled attempts
        self.add_observer(self.quarantine)
        self.add_gate(self.quarantine)
        self.memory_hint = MemoryHint(self._fleet)
        self.add_observer(self.memory_hint)
        self._dispatcher.add_holdback(self.memory_hint)
        # A submitter fault (invalid_params, unsupported) fails a task only once different agents agree.
        self.submitter_faults = SubmitterFaults(config.submitter_fault_confirmations, self._fleet, self._queues, clock)
        self._dispatcher.add_holdback(self.submitter_faults)
        self._dispatcher.add_holdback(self.trust)
        self.view.instance_gate = self.trust.why_waiting
        self.best = BestTasks()   # each job's best task by its manifest's spec.report, written with the job row
        self._settlement = Settlement(config, clock, self._queues, self._leases, self._ledger, self._retries,
                                      self.trust, self.submitter_faults, self._fleet, self._observers, self.best)
        #: active job id -> its waiters, each handed the job's final view when it finishes (no store read behind the
        #: next commit; one future per waiter, set directly: its request goes on in the loop's next turn)
        self._finished: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._lease_writes = LeaseWrites()   # lease commits in flight: a lease reply does not wait for its commit

    # -- registration -------------------------------------------------------------------------------
    def add_observer(self, observer: BoardObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: BoardObserver) -> None:
        """Stop telling ``observer`` (a no-op if it was not registered); so are the other ``remove_*``."""
        if observer in self._observers:
            self._observers.remove(observer)

    def add_gate(self, gate: LeaseGate) -> None:
        self._leases.add_gate(gate)

    def remove_gate(self, gate: LeaseGate) -> None:
        self._leases.remove_gate(gate)

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def time_dispatch(self, timer: DispatchTimer) -> None:
        """Tell ``timer`` how long each dispatch decision takes (the metrics' dispatch latency)."""
        self._dispatcher.time_dispatch(timer)

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        now = self.clock()
        self._fleet.load(await self.store.list_agents())
        jobs, tasks = await self.store.load_active()
        for job in jobs:
            self._queues.add_job(job)
        self._queues.add_tasks(tasks)
        self._leases.restore(tasks, now)
        await self.trust.start(jobs, tasks)   # (who ran which instance, from the rows, before the loop below)
        for job in jobs:   # a committed job's proofs, rebuilt in a thread (~2 s for 100k units), not at a lease
            if isinstance(job.envelope, dict) and job.envelope.get("units") is not None:
                self._leases.envelopes.adopt(job, await asyncio.to_thread(stored_proofs, job))
        # A result held for validation lives in memory only; its row stays stored as leased, so the restored
        # lease expires and the instance runs again. A row stored while held (no lease) is requeued here.
        for task in tasks:
            if task.state == TaskState.LEASED and not task.lease_id:
                self._queues.set_state(task, TaskState.QUEUED)
                task.agent_id = None
                self._queues.enqueue(task, front=True)
        for job in jobs:
            await self._maybe_finish(job.id, [])
        self._sweeper = run_every(self.config.expiry_interval_s, self.sweep, "lease sweep")
        log.info("board started: %d active jobs, %d tasks, %d agents", len(jobs), len(tasks), len(self.agents))

    async def stop(self) -> None:
        self.leasing = False
        self._dispatcher.wake()
        if self._sweeper is not None:
            await cancel_all([self._sweeper])
        # The store first: its close commits what is queued (lease commits in flight included) or, on a server
        # that stopped answering, fails it after its timeout; waiting for those commits before it could be forever.
        await self.store.close()
        await self.leases_stored()

    async def leases_stored(self) -> None:
        """Wait until every lease handed out so far has its commit landed (or taken back, hub/lease_writes.py)."""
        await self._lease_writes.drain()

    def _emit(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "at": self.clock(), **data}
        for listener in list(self._listeners):
            listener(event)

    @property
    def lease_wakeups(self) -> int:
        """Parked lease requests woken so far (all time; ``panal_lease_wakeups_total``): per dispatched
        task, what new work costs the fleet's waiting requests."""
        return self._dispatcher.waiters.woken

    @property
    def leasing(self) -> bool:
        """False once the board stops handing out work (it is shutting down)."""
        return self._dispatcher.leasing

    @leasing.setter
    def leasing(self, value: bool) -> None:
        self._dispatcher.leasing = value

    # -- agents -------------------------------------------------------------------------------------
    @property
    def agents(self) -> Mapping[str, AgentState]:
        return self._fleet.agents

    async def register_agent(self, key: PublicKey, name: str, capabilities: Capabilities,
                             owner: str | None = None) -> AgentState:
        """Register or update an agent; ``owner`` (from its admission token) counts only for a new one."""
        row = self._fleet.admission(key, name, capabilities, owner)
        await self.store.upsert_agent(row)
        state, joined = self._fleet.enrol(key, row, capabilities)
        self.trust.speed.apply(state)   # a claim seen to be far above the observed speed stays capped
        if joined:
            self._emit("agent_joined", agent=key.id, name=row.name)
        return state

    def agent(self, agent_id: str) -> AgentState:
        """The registered agent (Forbidden if it is not), noted as seen now."""
        return self._fleet.seen(agent_id)

    # -- jobs ---------------------------------------------------------------------------------------
    async def submit(self, envelope: Any, signer_id: str) -> tuple[JobRow, bool]:
        """Create a job from a submitter-signed envelope; idempotent on the same envelope."""
        signed = Envelope(envelope, signer_id)
        existing = self._queues.get_job(signed.job_id)
        if existing is not None:
            return existing, False
        try:
            # Inserted without a read first (one store round trip on the path of every new job): a job id
            # already stored (a finished job submitted again) fails the insert, which changes nothing; the
            # stored job is the answer, even if its manifest would no longer pass (limits, inputs since gone).
            if signed.lists is not None or len(signed.record.payload) > self.config.inline_envelope_bytes:
                # A big job (100k units: validated, expanded and, if committed, its tree built: ~1-2 s) is
                # made in a thread, so the board goes on answering leases and heartbeats meanwhile.
                job, tasks = await asyncio.to_thread(new_job, signed, self.config, self.blobs, self.clock())
            else:
                job, tasks = new_job(signed, self.config, self.blobs, self.clock())
            await self.store.create_job(job, tasks)
        except Exception:
            stored = await self.store.get_job(signed.job_id)
            if stored is None:
                raise
            live = self._queues.get_job(signed.job_id)   # (a twin submit that just won)
            if live is not None or stored.state.terminal:
                return live or stored, False
            # Stored and active, yet not on the board: its own insert committed but was answered with an error
            # (a connection dropped at COMMIT). Queued now, or it waits for a hub restart while its submitter
            # is told it exists.
            tasks = await self.store.get_tasks(stored.id)
            if (live := self._queues.get_job(stored.id)) is not None:
                return live, False
            job, created = stored, False
        else:
            created = True
        self._queues.add_job(job, tasks)
        if signed.proofs is not None and created:   # a committed job's tree, built at intake (else at its first lease)
            self._leases.envelopes.adopt(job, signed.proofs)
        self.trust.add_job(job, tasks)
        self._emit("job_submitted", job=job.id, name=job.name, tasks=len(tasks))   # (queued: waiters wake)
        return job, created

    async def cancel(self, job_id: str, requester: str) -> JobRow:
        job = self._queues.get_job(job_id)
        if job is None:
            stored = await self.store.get_job(job_id)
            if stored is None:
                raise NotFound(f"no job {job_id}", code="no_such_job")
            return stored  # already finished: cancelling is a no-op
        if job.submitter_id != requester:
            raise Forbidden(f"job {job_id} belongs to {job.submitter_id}", code="not_owner")
        now = self.clock()
        changed = []
        for task in self._queues.job_tasks(job_id):
            if not task.state.terminal:
                self._leases.set_state(task, TaskState.CANCELLED)
                task.error, task.updated_at = "cancelled by submitter", now
                changed.append(task)
        self._queues.clear(job_id)
        await self._maybe_finish(job_id, changed, cancelled=True)
        return job

    async def _maybe_finish(self, job_id: str, changed: Sequence[TaskRow], cancelled: bool = False,
                            results: Sequence[ResultRow] = ()) -> None:
        """Persist ``changed`` tasks (and results), finishing the job if every task is terminal."""
        await self._lease_writes.settled(task.id for task in changed)   # a task's lease lands before its next row
        job = self._queues.get_job(job_id)
        if job is None or job.state.terminal:  # finished by a concurrent call: just persist
            if results:
                await self.store.accept_results(results, changed, [])
            elif changed:
                await self.store.save_tasks(changed)
            return
        counts = self._queues.counts(job_id)
        terminal = (counts[TaskState.DONE] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
                    + counts[TaskState.INVALID])
        jobs: list[JobRow] = []
        finishing = cancelled or terminal >= job.n_tasks   # this call ends the job (set before any await)
        if finishing:
            if cancelled:
                job.state = JobState.CANCELLED
            elif counts[TaskState.FAILED]:
                job.state = JobState.FAILED
                failed = next(t for t in self._queues.job_tasks(job_id) if t.state == TaskState.FAILED)
                job.error = f"{counts[TaskState.FAILED]} of {job.n_tasks} tasks failed; " \
                            f"first: task {failed.idx}: {failed.error}"
            else:
                job.state = JobState.SUCCEEDED
            job.finished_at = self.clock()
            jobs.append(job)
        elif job.state == JobState.QUEUED and counts[TaskState.LEASED] + counts[TaskState.DONE]:
            job.state = JobState.RUNNING
            jobs.append(job)
        if self.best.changed(job_id) and job not in jobs:   # a new best task is committed with its result
            jobs.append(job)
        if results:
            await self.store.accept_results(results, changed, jobs)
        elif changed or jobs:
            await self.store.save_tasks(changed, jobs)
        if finishing:
            waiting = self._finished.pop(job_id, None)
            if waiting:
                final = job_summary(job, self.view.counts(job_id))   # as committed just above
                for waiter in waiting:
                    if not waiter.done():
                        waiter.set_result(final)
            self.submitter_faults.forget(t.id for t in self._queues.job_tasks(job_id))
            self.trust.forget(job)
            self._ledger.forget(self._queues.drop_job(job_id))
            self._leases.envelopes.forget(job_id)
            self._emit("job_finished", job=job_id, name=job.name, state=job.state.value)
            if waiting:   # their replies go out first, before what follows this commit (trust records, the next pick)
                await asyncio.sleep(0)

    def is_active(self, job_id: str) -> bool:
        """Whether the job is still queued or running (a finished one has left memory for the store)."""
        return job_id in self._queues

    async def wait_job(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's final view when it finishes within ``timeout_s`` (None: it did not, or was not active).

        The view is the one committed as the job finished, handed over from memory: a waiter reading it
        from the store instead would queue behind the commits that follow (trust records, the next job)."""
        if job_id not in self._queues or timeout_s <= 0:
            return None
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting = self._finished.setdefault(job_id, set())
        waiting.add(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            return None
        finally:
            waiting.discard(waiter)
            if not waiting and self._finished.get(job_id) is waiting:
                del self._finished[job_id]

    # -- leases -------------------------------------------------------------------------------------
    async def lease(self, agent_id: str, slots: int, wait_s: float,
                    have: Mapping[str, str] | None = None) -> list[Assignment]:
        """Hand out up to ``slots`` tasks, long-polling up to ``wait_s`` for the first one. ``have``: the
        envelopes the agent holds (``LeaseRequest.have``), left out of the assignments (hub/envelopes.py)."""
        agent = self.agent(agent_id)
        picked = await self._dispatcher.pick(agent, slots, wait_s)
        picked, back = self.trust.screen(agent, picked)   # never two instances of one unit to one agent
        self._queues.restore(back, ready=True)
        picked = await self._spot_check(agent, picked, slots)
        if not picked:
            return []
        writes = self._leases.grant(agent, picked, self.clock())
        granted = [(task, task.lease_id) for task in picked]
        starting = [job for job in {task.job_id: self._queues.job(task.job_id) for task in picked}.values()
                    if job.state == JobState.QUEUED]
        for job in starting:   # (as its tasks are leased in memory: views show both at once)
            job.state = JobState.RUNNING
        # One write with the jobs it starts, queued now (its place in the store's order; committed while the reply
        # travels, on SQLite as the step that writes it ends: hub/sqlite_writer.py); the reply does not wait for it
        # (hub/lease_writes.py: what waits for it instead, what a crash costs).
        lease_write = self.store.save_leases(writes, [dataclasses.replace(job) for job in starting])
        self._lease_writes.track((task.id for task in picked), self._lease_landed(lease_write, granted))
        self._leases.commit(picked)
        await self.trust.leased(agent, picked)   # may queue a second instance to run in parallel
        # Only leases still this agent's: while trust's records were written, the job may have been cancelled or
        # the agent's leases released (quarantine, a lost agent), and those tasks are no longer its to run.
        picked = [task for task, lease_id in granted if self._leases.holds(task, agent.row.id, lease_id)]
        self._stats["leases"] += len(picked)
        assignments, envelopes = self._leases.assignments(picked, have)
        self._stats["envelopes_sent"] += envelopes.sent
        self._stats["envelopes_omitted"] += envelopes.omitted
        self._stats["envelopes_to_fetch"] += envelopes.to_fetch
        return assignments

    def leased_envelope(self, agent_id: str, job_id: str) -> JobEnvelope:
        """A job's envelope for an agent holding a lease of one of its tasks (``GET /v1/jobs/{id}/envelope``)."""
        entry = self._leases.leased_envelope(agent_id, job_id)
        self._stats["envelopes_fetched"] += 1
        return entry

    async def _lease_landed(self, lease_write: Awaitable[None], granted: list[tuple[TaskRow, str | None]]) -> None:
        """After a lease reply: its commit landed, or it failed and the leases still current are taken back
        (their agent's results will be refused as expired leases; a job's start is written again with its next
        change)."""
        try:
            await lease_write
        except Exception:
            log.exception("a lease commit failed: %d leases taken back", len(granted))
            self._leases.undo([task for task, lease_id in granted
                               if task.state == TaskState.LEASED and task.lease_id == lease_id])

    def retry_after(self, agent_id: str) -> float | None:
        """How long an agent a lease request found nothing for should wait before asking again (hub/pacing.py)."""
        agent = self._fleet.agents.get(agent_id)
        return self._dispatcher.retry_after(agent) if agent is not None else None

    async def _spot_check(self, agent: AgentState, picked: list[TaskRow], slots: int) -> list[TaskRow]:
        """Now and then give an untrusted agent an instance of a unit whose answer is known (hub/trust/)."""
        room = self._leases.allowance(agent, slots)   # what it may get now: its capacity counts, not what it asked
        unit = self.trust.spot_candidate(agent) if self.leasing and agent.refused is None and room > 0 else None
        if unit is None:
            return picked
        row = self.trust.new_instance(unit)
        job = self._queues.job(unit.job_id)
        await self.trust.add_rows(job, [row])
        self._queues.take(job.id, [row])
        if len(picked) >= room:   # it takes the place of the last task picked, which goes back first in line
            self._queues.restore(picked[-1:], ready=True)
            picked = picked[:-1]
        return [*picked, row]

    async def heartbeat(self, agent_id: str, leases: Sequence[HeartbeatLease]) -> HeartbeatReply:
        """Extend the caller's leases; report the ones it no longer holds so it can stop them."""
        self.agent(agent_id)
        lost, checkpoints = self._leases.heartbeat(agent_id, leases)
        if checkpoints:  # a checkpoint is worth a commit: it is what a retry resumes from
            await self._lease_writes.settled(task.id for task in checkpoints)
            await self.store.save_tasks(checkpoints)
        return HeartbeatReply(self.config.lease_ttl_s, tuple(lost))

    async def release(self, agent_id: str, task_id: str, lease_id: str) -> None:
        """The agent gives a lease back (a long pause, shutting down): requeued at once, with no attempt used
        unless the task was handed back too often (hub/retries.py)."""
        task = self._queues.task(task_id)
        if task is None or not self._leases.holds(task, agent_id, lease_id):
            return
        self._retries.hand_back(task)
        await self._maybe_finish(task.job_id, [task])

    async def sweep(self) -> None:
        """Requeue expired leases (attempt + 1) and release retry backoffs that are due."""
        now = self.clock()
        self._queues.release_due(now)   # (queued again: the queue index wakes who may run them)
        changed: dict[str, list[TaskRow]] = {}
        for task in self._queues.past_deadline(now):   # nobody can run them in time any more
            self._leases.set_state(task, TaskState.FAILED)
            task.error, task.error_class, task.updated_at = "the job's deadline passed before it ran", "deadline", now
            changed.setdefault(task.job_id, []).append(task)
        for task in self._leases.expired(now):
            if self._leases.timed_out(task, now):   # heartbeated, but past the task's timeout + grace
                failure, why = FailureClass.TIMEOUT, (
                    f"the task ran past its timeout ({self._queues.job(task.job_id).timeout_s:g} s) and the "
                    f"hub's grace ({self.config.lease_timeout_grace_s:g} s): the board ended the lease")
            else:
                failure, why = FailureClass.AGENT_LOST, "the agent stopped heartbeating (lease expired)"
            log.info("lease of task %s on agent %s ended: %s (attempt %d)", task.id, task.agent_id, failure.value,
                     task.attempt)
            self._stats["expired"] += 1
            self._emit("lease_expired", task=task.id, agent=task.agent_id)
            self._settlement.settled(task.agent_id or "?", task, False, failure.value, {})
            self._retries.fail_attempt(task, failure, why)
            changed.setdefault(task.job_id, []).append(task)
        for job_id, tasks in changed.items():
            await self._maybe_finish(job_id, tasks)

    # -- results ------------------------------------------------------------------------------------
    async def accept(self, agent_id: str, records: Sequence[ResultItem]) -> list[ResultOutcome]:
        """Accept signed results exactly once; each gets its own outcome."""
        agent = self.agent(agent_id)
        outcomes: list[ResultOutcome] = []
        staged: Staged = {}
        waits: list[asyncio.Future[None]] = []
        for item in records:
            try:
                receipt = self._ledger.receive(agent, item)
                found = await self._ledger.lookup(agent, receipt)
            except PanalError as exc:
                outcomes.append(self._ledger.refused(item, exc))
                continue
            if isinstance(found, ResultOutcome):   # seen before: a re-send waits for the original's commit
                waits += self._ledger.in_flight(found)
                outcomes.append(found)
            elif (too_large := self._settlement.oversized(receipt)) is not None:
                self._settlement.fail(found, agent.row.id, FailureClass.ERROR, too_large.message, {}, staged)
                outcomes.append(self._ledger.refused(item, too_large))
            else:
                outcomes.append(self._settlement.settle(agent, found, receipt, staged))
        await self._ledger.commit(staged, self._maybe_finish)
        await self.trust.flush()   # instances to add, validation records, reputation, credit
        if waits:
            await asyncio.gather(*waits)
        return outcomes

    # -- views --------------------------------------------------------------------------------------
    async def job_view(self, job_id: str) -> dict[str, Any]:
        return await self.view.job_view(job_id)

    async def tasks_of(self, job_id: str) -> list[TaskRow]:
        """A job's task rows: live while it is active, else as stored."""
        if job_id in self._queues:
            return self._queues.job_tasks(job_id)
        return await self.store.get_tasks(job_id)

    async def trust_records(self, job_id: str) -> list[dict[str, Any]]:
        """Each settled unit's validation record, and the live state of the units still pending."""
        settled = {v.unit: {"unit": v.unit, "state": v.state, "quorum": v.quorum, "agents": v.agents,
                            "canonical_task": v.canonical_task, "detail": v.detail}
                   for v in await self.store.get_validations(job_id)}
        for unit in self.trust.job_units(job_id):
            if unit["unit"] not in settled:
                settled[unit["unit"]] = {**unit, "state": "pending" if unit["state"] == "pending" else unit["state"],
                                         "canonical_task": None, "detail": {}}
        return [settled[k] for k in sorted(settled)]

    def status(self) -> dict[str, Any]:
        return self.view.status()
