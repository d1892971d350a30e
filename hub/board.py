"""The board: live scheduling state in memory, written through to the store before any ack.

A board holds the queued tasks of active jobs, the leases handed out to agents, and the waiters of
long-poll lease requests. Every state change a client could rely on (a job accepted, a lease
granted, a result accepted) is committed to the store before the call returns, so a ``kill -9``
loses nothing that was acknowledged. Heartbeats only extend leases in memory: after a restart each
lease gets one fresh TTL, which is as good as a heartbeat.

The board wires its parts and owns the job life cycle: :class:`~hub.queues.JobQueues` (what waits,
in what order), :class:`~hub.leases.LeaseTable` (who holds what until when), the
:class:`~hub.ledger.ResultLedger` (which results count) and :class:`~hub.readmodel.BoardView`
(what views read). Three parts carry out its calls: :class:`~hub.handout.Handout` answers lease requests,
:class:`~hub.lease_upkeep.LeaseUpkeep` keeps, takes back and expires leases, and
:class:`~hub.completion.JobCompletion` commits what changed and finishes jobs. Plugins
(:mod:`hub.protocols`) are registered explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hub.background import cancel_all, run_every
from hub.best import BestTasks
from hub.blob_backend import BlobBackend
from hub.completion import JobCompletion
from hub.config import HubConfig
from hub.dispatch import make_policy
from hub.dispatch.memory_hint import MemoryHint
from hub.dispatcher import Dispatcher
from hub.envelopes import JobEnvelope, stored_proofs
from hub.fleet import AgentState, Fleet
from hub.handout import Handout
from hub.intake import Envelope, new_job, stored_job_requires
from hub.lease_upkeep import LeaseUpkeep
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
from hub.readmodel import BoardView
from hub.records import JobRow, TaskRow, TaskState
from hub.retries import Retries
from hub.settlement import Settlement
from hub.store import Store
from hub.submitter_faults import SubmitterFaults
from hub.trust.trust import Trust
from jobs.errors import FailureClass
from jobs.protocol import Assignment
from jobs.protocol_results import ResultItem, ResultOutcome
from jobs.protocol_upkeep import HeartbeatLease, HeartbeatReply
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
        self._sweeper: asyncio.Task[None] | None = None
        self._lease_writes = LeaseWrites()   # lease commits in flight: a lease reply does not wait for its commit
        self._completion = JobCompletion(store, clock, self._queues, self._leases, self._ledger, self.trust,
                                         self.submitter_faults, self.best, self.view, self._lease_writes, self._emit)
        self._handout = Handout(store, clock, self._queues, self._fleet, self._leases, self._dispatcher, self.trust,
                                self._lease_writes, self._stats)
        self._upkeep = LeaseUpkeep(config, clock, store, self._queues, self._fleet, self._leases, self._retries,
                                   self._settlement, self._lease_writes, self._stats, self._emit,
                                   self._completion.maybe_finish)

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
            stored_job_requires(job)   # a clause added since the job was stored (unit-proofs for a committed one)
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
            await self._completion.maybe_finish(job.id, [])
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
        await self._completion.maybe_finish(job_id, changed, cancelled=True)
        return job

    def is_active(self, job_id: str) -> bool:
        """Whether the job is still queued or running (a finished one has left memory for the store)."""
        return job_id in self._queues

    async def wait_job(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The job's final view when it finishes within ``timeout_s`` (None: it did not, or was not active)."""
        return await self._completion.wait_job(job_id, timeout_s)

    # -- leases (hub/handout.py, hub/lease_upkeep.py) -----------------------------------------------
    async def lease(self, agent_id: str, slots: int, wait_s: float,
                    have: Mapping[str, str] | None = None) -> list[Assignment]:
        """Hand out up to ``slots`` tasks, long-polling up to ``wait_s`` for the first one."""
        return await self._handout.lease(agent_id, slots, wait_s, have)

    def leased_envelope(self, agent_id: str, job_id: str) -> JobEnvelope:
        """A job's envelope for an agent holding a lease of one of its tasks (``GET /v1/jobs/{id}/envelope``)."""
        return self._handout.leased_envelope(agent_id, job_id)

    def retry_after(self, agent_id: str) -> float | None:
        """How long an agent a lease request found nothing for should wait before asking again."""
        return self._handout.retry_after(agent_id)

    async def heartbeat(self, agent_id: str, leases: Sequence[HeartbeatLease]) -> HeartbeatReply:
        """Extend the caller's leases; report the ones it no longer holds so it can stop them."""
        return await self._upkeep.heartbeat(agent_id, leases)

    async def release(self, agent_id: str, task_id: str, lease_id: str) -> None:
        """The agent gives a lease back (a long pause, shutting down)."""
        await self._upkeep.release(agent_id, task_id, lease_id)

    async def sweep(self) -> None:
        """Requeue expired leases (attempt + 1) and release retry backoffs that are due."""
        await self._upkeep.sweep()

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
        await self._ledger.commit(staged, self._completion.maybe_finish)
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
