"""The lease table: which agent holds which task until when, and whether an agent may have work.

A lease has a TTL; a heartbeat extends it (in memory only: after a restart each lease gets one
fresh TTL, which is as good as a heartbeat) and carries progress and the latest checkpoint. The
sweep finds leases past their expiry. Gates (:class:`~hub.protocols.LeaseGate`) may refuse an agent
work; this is the one place that decides how much work an agent may hold.

Bounds the board enforces whatever an agent says: an agent holds at most its advertised ``slots``
(and never more than ``max_slots_per_agent``), counting what it holds already, so asking again and
again gets it nothing more; and a lease ends at the task's timeout plus ``lease_timeout_grace_s``
however often it is heartbeated (its *hard end*): an agent that heartbeats forever loses the task,
which is retried or failed as a timeout. The hard end lives in memory: after a restart each lease
gets a fresh one (the outage is not the agent's fault).
"""

from __future__ import annotations

import heapq
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence

from hub.blob_backend import BlobBackend
from hub.config import HubConfig
from hub.envelopes import JobEnvelope, JobEnvelopes, ReplyEnvelopes
from hub.fleet import AgentState, Fleet, reported_slots, slots_of
from hub.protocols import LeaseGate
from hub.queues import JobQueues
from hub.records import TaskRow, TaskState
from hub.store import LeaseWrite
from jobs.checkpoints import verify_checkpoint
from jobs.protocol import Assignment
from jobs.protocol_upkeep import HeartbeatLease, LossReason, LostLease
from security.errors import Forbidden, NotFound, PanalError
from security.records import SignedRecord

__all__ = ["LeaseTable"]

log = logging.getLogger(__name__)


class LeaseTable:
    """Leases of the active tasks; their expiry, heartbeats and the gates in front of them."""

    def __init__(self, config: HubConfig, clock: Callable[[], float], queues: JobQueues, fleet: Fleet,
                 blobs: BlobBackend | None) -> None:
        self.config, self.clock = config, clock
        self._queues, self._blobs = queues, blobs
        self._agents = fleet.agents
        self._expiry: list[tuple[float, str, str]] = []     # (expires at, task id, lease id)
        self._gates: list[LeaseGate] = []
        self._hard_end: dict[str, float] = {}               # task id -> its lease ends then, heartbeats or not
        self.envelopes = JobEnvelopes(config.inline_envelope_bytes)   # each active job's envelope, decoded once
        #: told of an agent a task left that may now be free *later* than a policy counted (see :meth:`_vacate`)
        self.on_later: Callable[[AgentState], None] = lambda agent: None

    # -- who may have work --------------------------------------------------------------------------
    def add_gate(self, gate: LeaseGate) -> None:
        self._gates.append(gate)

    def remove_gate(self, gate: LeaseGate) -> None:
        if gate in self._gates:
            self._gates.remove(gate)

    def capacity(self, agent: AgentState) -> int:
        """How many tasks the agent may hold at once: its advertised slots, within the hub's cap."""
        cap, reported = max(self.config.max_slots_per_agent, 1), reported_slots(agent)
        return cap if reported is None else min(reported, cap)

    def allowance(self, agent: AgentState, slots: int) -> int:
        """How many tasks the agent may get in one lease request: what it asked, within one request's
        cap and the free part of its capacity (what it holds already counts)."""
        free = self.capacity(agent) - len(agent.running)
        return max(0, min(slots, self.config.max_tasks_per_lease, free))

    def refusal(self, agent: AgentState) -> str | None:
        """The first gate's reason to give the agent no work now (also noted on the agent), or None."""
        agent.refused = next((r for g in self._gates if (r := g.refuse(agent))), None)
        return agent.refused

    # -- granting and ending ------------------------------------------------------------------------
    def grant(self, agent: AgentState, tasks: Sequence[TaskRow], now: float) -> list[LeaseWrite]:
        """Lease ``tasks`` to the agent; the writes to commit before anyone is told."""
        writes = []
        for task in tasks:
            hard_end = self._start_hard_end(task, now)
            expires = min(now + self.config.lease_ttl_s, hard_end)
            self.set_state(task, TaskState.LEASED)
            task.lease_id, task.agent_id, task.lease_expires_at, task.updated_at = (
                secrets.token_hex(8), agent.row.id, expires, now)
            agent.running.add(task.id)
            writes.append((task.id, task.lease_id, agent.row.id, task.attempt, expires))
        return writes

    def undo(self, tasks: Sequence[TaskRow]) -> None:
        """The grant was not committed: put the tasks back at the front of their queues, as they were."""
        for task in tasks:
            self.set_state(task, TaskState.QUEUED)
            task.lease_id = task.agent_id = task.lease_expires_at = None
            self._queues.enqueue(task, front=True)

    def commit(self, tasks: Sequence[TaskRow]) -> None:
        """The grant is stored: start watching the leases' expiry."""
        for task in tasks:
            assert task.lease_id is not None and task.lease_expires_at is not None
            heapq.heappush(self._expiry, (task.lease_expires_at, task.id, task.lease_id))

    def restore(self, tasks: Sequence[TaskRow], now: float) -> None:
        """The leases among tasks loaded at start: the outage may have outlived them, so each gets one TTL."""
        for task in tasks:
            if task.state != TaskState.LEASED or not task.lease_id:
                continue
            task.lease_expires_at = max(task.lease_expires_at or 0.0, now + self.config.lease_ttl_s)
            self._start_hard_end(task, now)
            heapq.heappush(self._expiry, (task.lease_expires_at, task.id, task.lease_id))
            agent = self._agents.get(task.agent_id or "")
            if agent is not None:
                agent.running.add(task.id)

    def set_state(self, task: TaskRow, state: TaskState) -> None:
        """Every task state change goes through here: a task leaving LEASED leaves its agent's running set."""
        if task.state == TaskState.LEASED:
            self._vacate(task)
        self._queues.set_state(task, state)

    def _start_hard_end(self, task: TaskRow, now: float) -> float:
        hard_end = now + self._queues.job(task.job_id).timeout_s + self.config.lease_timeout_grace_s
        self._hard_end[task.id] = hard_end
        return hard_end

    def timed_out(self, task: TaskRow, now: float) -> bool:
        """Whether the task's lease ran into its hard end (the task's timeout plus the grace)."""
        return now >= self._hard_end.get(task.id, float("inf"))

    def _vacate(self, task: TaskRow) -> None:
        self._hard_end.pop(task.id, None)
        agent = self._agents.get(task.agent_id or "")
        if agent is not None:
            agent.running.discard(task.id)
            # An agent's free time (``Predictor.free_at``) is its soonest task's end while it is full, else the
            # end of its pause. A task leaving an agent that stays full (it registered again with fewer slots) or
            # is told to pause past now moves that time later: by a cancel of its job, another instance's
            # verdict, its own result awaiting replicas, none of them a pick or settled attempt of its own.
            # Policies that kept its earlier free time (fastest's covers) must hear it (``DispatchView.note``).
            if len(agent.running) >= slots_of(agent) or agent.quiet_until > self.clock():
                self.on_later(agent)

    def settle(self, task: TaskRow) -> None:
        """The agent is done with the task but its result awaits validation: end the lease, keep the task."""
        self._vacate(task)
        task.lease_id = task.lease_expires_at = None
        task.progress = 1.0   # its agent finished it

    def assignments(self, tasks: Sequence[TaskRow], have: Mapping[str, str] | None = None
                    ) -> tuple[list[Assignment], ReplyEnvelopes]:
        """What the agent is told of the leases it got: each job's envelope only where it needs it
        (hub/envelopes.py; ``have`` is what its request said it holds), and how many went or were left out."""
        envelopes = ReplyEnvelopes(self.envelopes, have)
        return [self.assignment(task, envelopes) for task in tasks], envelopes

    def assignment(self, task: TaskRow, envelopes: ReplyEnvelopes | None = None) -> Assignment:
        """What the agent is told of one lease it got (with its job's envelope unless ``envelopes`` says not)."""
        job = self._queues.job(task.job_id)
        assert task.lease_id is not None
        envelope = envelopes.take(job) if envelopes is not None else self.envelopes.of(job).record
        # the unit's index: an agent checks the params against that point of the signed manifest (of a committed
        # job, against the signed root with the unit's proof: hub/envelopes.py)
        record = SignedRecord.from_wire(task.checkpoint_record) if task.checkpoint_record else None
        return Assignment(task.id, job.id, task.unit_idx, task.lease_id, task.attempt, job.kind, task.params,
                          job.timeout_s, self.config.lease_ttl_s, envelope, task.checkpoint, record,
                          self.envelopes.of(job).proof(task.unit_idx))

    def leased_envelope(self, agent_id: str, job_id: str) -> JobEnvelope:
        """A job's envelope for an agent holding a lease of one of its tasks (it fetches what its lease reply
        left out); nobody else: a job's manifest is its submitter's business and its lessees'."""
        job = self._queues.get_job(job_id)
        if job is None:
            raise NotFound(f"no active job {job_id}", code="no_such_job")
        agent = self._agents.get(agent_id)
        if agent is None or not any(self.holds(t, agent_id, t.lease_id) and t.job_id == job_id
                                    for t in map(self._queues.task, agent.running) if t is not None):
            raise Forbidden(f"job {job_id}: an agent may read a job's manifest only while it holds a lease of one "
                            "of its tasks", code="not_leased")
        return self.envelopes.of(job)

    def holds(self, task: TaskRow | None, agent_id: str, lease_id: object) -> bool:
        return task is not None and task.state == TaskState.LEASED and task.lease_id == lease_id \
            and task.agent_id == agent_id

    # -- heartbeats and expiry ----------------------------------------------------------------------
    def heartbeat(self, agent_id: str, leases: Sequence[HeartbeatLease]) -> tuple[list[LostLease], list[TaskRow]]:
        """Extend the caller's leases: the ones it no longer holds, and the tasks with a new checkpoint."""
        now = self.clock()
        lost: list[LostLease] = []
        checkpoints: list[TaskRow] = []
        seen: set[str] = set()
        for item in leases:
            if item.task_id in seen:   # one lease listed 60,000 times must not push 60,000 expiry entries
                continue
            seen.add(item.task_id)
            task = self._queues.task(item.task_id)
            if task is None or not self.holds(task, agent_id, item.lease_id):
                cancelled = task is not None and task.state == TaskState.CANCELLED
                lost.append(LostLease(item.task_id, LossReason.CANCELLED if cancelled else LossReason.LOST))
                continue
            if item.progress is not None:
                task.progress = min(max(float(item.progress), 0.0), 1.0)
            if item.checkpoint is not None and item.checkpoint != task.checkpoint and self._checkpoint_ok(task, item):
                assert item.checkpoint_record is not None
                task.checkpoint, task.checkpoint_record = item.checkpoint, item.checkpoint_record.to_wire()
                checkpoints.append(task)
            expires = min(now + self.config.lease_ttl_s, self._hard_end.get(task.id, float("inf")))
            task.lease_expires_at = expires
            assert task.lease_id is not None
            heapq.heappush(self._expiry, (expires, task.id, task.lease_id))
        return lost, checkpoints

    def _checkpoint_ok(self, task: TaskRow, item: HeartbeatLease) -> bool:
        """A checkpoint counts only with the lessee's signed record of it, for this task and the attempt
        it holds, naming a blob the board has (else it is ignored: the task keeps its last good one)."""
        if item.checkpoint_record is None:
            log.warning("task %s: checkpoint %s comes without a signed record: ignored", task.id, item.checkpoint)
            return False
        try:
            verify_checkpoint(item.checkpoint_record, task.id, sha256=item.checkpoint, attempt=task.attempt,
                              signer=task.agent_id)
        except PanalError as exc:
            log.warning("task %s: checkpoint refused: %s", task.id, exc.message)
            return False
        return self._blobs is None or self._blobs.exists(item.checkpoint or "")

    def expired(self, now: float) -> list[TaskRow]:
        """Tasks whose lease has run out (not settled, re-leased or extended since)."""
        out: dict[str, TaskRow] = {}   # a heartbeat adds an entry per extension: one task, once
        while self._expiry and self._expiry[0][0] <= now:
            _, task_id, lease_id = heapq.heappop(self._expiry)
            task = self._queues.task(task_id)
            if task is None or task.state != TaskState.LEASED or task.lease_id != lease_id \
                    or (task.lease_expires_at or 0.0) > now:
                continue
            out[task_id] = task
        return list(out.values())
