"""The daemon's link to one board: registration and three loops, and the results on their way back.

Lease (long-poll for work, carrying finished results on the way), heartbeat (extends the leases of
running tasks and learns which were lost) and flush (delivers results when no lease request is about
to carry them). A result is in the outbox on disk before it is sent and leaves it only once the board
answered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.client.board import BoardClient
from agent.client.breaker import BreakerState
from agent.daemon.envelopes import EnvelopeBook, HeldEnvelopes
from agent.daemon.hooks import CodeConsent, HoldOff, SubmitterCheck
from agent.daemon.outbox import Outbox
from agent.daemon.result_batches import (
    DEFAULT_MAX_BODY_BYTES,
    MIN_MAX_BODY_BYTES,
    batch_window_s,
    encoded_size,
    take_batch,
    too_large,
)
from agent.daemon.settings import DaemonSettings
from agent.daemon.slots import Slots
from jobs.protocol import Assignment, LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_results import Outcome, ResultOutcome, ResultsReply, ResultsRequest
from jobs.protocol_upkeep import Heartbeat, HeartbeatLease, HeartbeatReply, Release, Released
from jobs.requirements import Capabilities
from security.errors import PanalError, PayloadTooLarge
from security.records import SignedRecord, decode
from security.tls import BoardAddress

__all__ = ["MAX_BOARD_PAUSE_S", "MAX_ENVELOPE_BYTES", "MISSING_ENVELOPE_COOLDOWN_S", "UNTRUSTED_COOLDOWN_S",
           "BoardLink", "LinkOwner", "Running", "outbox_key"]

log = logging.getLogger(__name__)
#: after handing back a task from an untrusted submitter, leave that board alone this long
UNTRUSTED_COOLDOWN_S = 30.0
#: after handing back tasks a board sent without an envelope we never had from it, leave that board alone this long
MISSING_ENVELOPE_COOLDOWN_S = 30.0
#: how long fetching a lease reply's envelopes may take, all together (a big one, behind other agents' at a busy
#: board)
ENVELOPE_FETCH_S = 120.0
#: the most of a fetched envelope this agent reads: a board's own default request limit is 4 MiB, and an envelope
#: is no bigger than the submit that carried it; a lying board's endless body stops here (and the book holds at
#: most DEFAULT_BOOK_SIZE of these per board)
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
#: a job id this agent puts in a URL: a board's ids are "j" + 20 hex digits
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: the longest pause a board's ``retry_after_s`` can ask for (a board that had nothing for us, hub/pacing.py)
MAX_BOARD_PAUSE_S = 600.0


@dataclass
class Running:
    """A task this agent holds a lease on: what its heartbeat reports, and how to stop it."""

    assignment: Assignment
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    progress: float = 0.0
    lost: bool = False                 # the lease is gone (or handed back): no result from us
    checkpoint: str | None = None      # sha256 of the latest checkpoint uploaded to the board
    checkpoint_record: SignedRecord | None = None   # our signature over (task, attempt, that sha256)
    uploads: set[asyncio.Task[None]] = field(default_factory=set)
    device: str = "cpu"                # where it runs (a GPU pause stops only the tasks on that GPU)
    worker: Any = None                 # the warm worker running it, once it has one (to stop and continue)


class LinkOwner(Protocol):
    """What a board link needs from the daemon that owns it."""

    @property
    def settings(self) -> DaemonSettings: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def slots(self) -> Slots: ...

    @property
    def board_count(self) -> int: ...

    def registration(self) -> Registration:
        """Key, name and the capabilities advertised now."""
        ...

    def start_task(self, link: BoardLink, assignment: Assignment) -> None:
        """Run a leased task in the background; it gives its slot back when done."""
        ...


def outbox_key(record: SignedRecord) -> str:
    """A result's outbox name: task and lease, so two attempts of one task never share a file."""
    try:
        payload = decode(record.payload)
    except PanalError:
        return "unreadable"
    return f"{payload.get('task_id')}.{payload.get('lease_id')}" if isinstance(payload, dict) else "unreadable"


class BoardLink:
    """Everything the daemon keeps about one board, and the loops that talk to it."""

    def __init__(self, owner: LinkOwner, address: BoardAddress, client: BoardClient, outbox: Outbox, *,
                 trusted: SubmitterCheck | None = None, hold_off: HoldOff | None = None,
                 code: CodeConsent | None = None) -> None:
        self.owner = owner
        self.address = address
        self.client = client
        self.outbox = outbox
        self.trusted = trusted            # None: trust the board's submitters (a WAN hub vouches)
        self.hold_off = hold_off          # None: lease again at once
        self.code = code or CodeConsent()  # whose own code (sandboxed kinds) runs from this board: nobody's
        self.cooldown_until = 0.0         # monotonic time before which we do not lease from it
        self.refused: str | None = None   # why the board gives us no work (quarantine), if it says
        self.standing: dict[str, Any] = {}   # credit, invalid results and reputation, as the board says
        self.pending: list[SignedRecord] = outbox.load()
        self.running: dict[str, Running] = {}
        #: leased tasks not yet running: their reply waits for an envelope fetch (heartbeated meanwhile: a fetch
        #: behind other agents' at a busy board may outlast the lease)
        self.fetching: dict[str, Assignment] = {}
        self.envelopes = EnvelopeBook()   # what this board sent us, by its job ids (agent/daemon/envelopes.py)
        self.flush = asyncio.Event()
        self.lease_ttl_s = 30.0
        self.max_poll_wait_s = 20.0       # the board's longest long-poll (it says so at registration)
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES   # its largest request (GET /v1/limits, or a 413)
        self.registered = False
        self.done = 0
        self.failed = 0
        self._lease: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start leasing and flushing (heartbeats start once registered)."""
        self._lease = asyncio.create_task(self._lease_loop(), name=f"lease {self.address.url}")
        self._loops = [self._lease, asyncio.create_task(self._flush_loop(), name="flush")]

    async def stop_leasing(self) -> None:
        """Ask for no more work; heartbeats and deliveries go on (a draining daemon)."""
        if self._lease is not None:
            self._lease.cancel()
            await asyncio.gather(self._lease, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every loop; running tasks (and their uploads) are not touched."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    @property
    def breaker_state(self) -> BreakerState:
        return self.client.breaker.state

    def status(self) -> dict[str, Any]:
        """This board's row in the daemon's status."""
        return {"url": self.address.url, "registered": self.registered, "breaker": self.breaker_state.value,
                "outbox": len(self.pending), "refused": self.refused, "done": self.done, "failed": self.failed,
                "standing": self.standing}

    # -- tasks ------------------------------------------------------------------------------------
    def trusts(self, submitter: str) -> bool:
        return self.trusted is None or self.trusted(submitter)

    def registration(self) -> Registration:
        """The daemon's registration, with whose code this agent accepts from this board."""
        reg = self.owner.registration()
        caps = {**reg.capabilities.raw, "code_from": self.code.report()}
        return Registration(reg.public_key, reg.name, Capabilities.from_dict(caps))

    async def release(self, assignment: Assignment) -> None:
        """Hand a leased task back (no attempt used); best effort, once."""
        with contextlib.suppress(PanalError):
            await self.client.post(f"/v1/tasks/{assignment.task_id}/release", Release(assignment.lease_id),
                                   Released.decode, retry=False, timeout_s=5.0)

    async def refuse(self, assignment: Assignment, submitter: str) -> None:
        """Hand a task from an untrusted submitter back and leave this board alone for a while, so
        agents that do trust the submitter take it."""
        log.warning("refusing job %s on %s: submitter %s is not in the trust store (`panal trust add`)",
                    assignment.job_id, self.address.url, submitter)
        self.cooldown_until = time.monotonic() + UNTRUSTED_COOLDOWN_S
        await self.release(assignment)

    async def refuse_code(self, assignment: Assignment, submitter: str) -> None:
        """Hand back a task running a submitter's own code that this agent did not consent to (a
        board that ignored our ``code_from``), and leave the board alone for a while."""
        log.warning("refusing job %s on %s: it runs code from %s, which this agent does not accept "
                    "(`panal trust add KEY --code` or `panal agent join URL --allow-code`)",
                    assignment.job_id, self.address.url, submitter)
        self.cooldown_until = time.monotonic() + UNTRUSTED_COOLDOWN_S
        await self.release(assignment)

    async def fetch_envelopes(self, held: HeldEnvelopes, missing: Sequence[Assignment]) -> dict[str, str]:
        """Ask this board for the envelopes its reply left out that we do not hold (one too big to inline, or
        a board that forgot): from the board the tasks came from, never another. Why each job's failed."""
        failed: dict[str, str] = {}
        # one time limit for the reply's fetches, not one per job: the slots this reply holds wait meanwhile
        # (a lying board naming 64 jobs and answering none would hold them 64 x ENVELOPE_FETCH_S)
        deadline = time.monotonic() + ENVELOPE_FETCH_S
        for job_id in dict.fromkeys(a.job_id for a in missing):
            if not _JOB_ID.fullmatch(job_id):
                failed[job_id] = "the board names it with a malformed job id"
                continue
            if (left := deadline - time.monotonic()) <= 0:
                failed[job_id] = f"not asked: this reply's envelopes took over {ENVELOPE_FETCH_S:.0f} s already"
                continue
            try:
                value = await self.client.call("GET", f"/v1/jobs/{job_id}/envelope", retry=False,
                                               timeout_s=left, max_reply_bytes=MAX_ENVELOPE_BYTES)
                held.add(job_id, SignedRecord.from_wire(value))
            except PanalError as exc:
                failed[job_id] = f"the board did not send it when asked: {exc.message}"
        return failed

    async def hand_back_missing(self, missing: Sequence[Assignment], why: dict[str, str]) -> None:
        """Hand back tasks that came without an envelope we hold or could fetch from their board (a lying or
        broken board), so they never run here and another agent takes them; and leave the board alone a while."""
        for assignment in missing:
            log.warning("handing back task %s from %s: it came without its job's signed manifest (job %s), and "
                        "this agent holds none from that board: %s", assignment.task_id, self.address.url,
                        assignment.job_id, why.get(assignment.job_id, "not sent"))
        self.cooldown_until = time.monotonic() + MISSING_ENVELOPE_COOLDOWN_S
        await asyncio.gather(*(self.release(a) for a in missing))

    async def hand_back_running(self) -> None:
        """Stop every running task and hand it back with its latest checkpoint (a drain ran out of time)."""
        await asyncio.gather(*(self.hand_back(task_id) for task_id in list(self.running)))

    async def hand_back(self, task_id: str) -> None:
        """Give a running task back with its latest checkpoint, so another agent continues it (a long
        pause): the checkpoint on its way is uploaded and told to the board first, then the lease is
        released (no attempt used) and the task stopped here."""
        running = self.running.get(task_id)
        if running is None or running.lost:
            return
        running.lost = True   # no result from us, whatever the worker does now
        await asyncio.gather(*list(running.uploads), return_exceptions=True)
        if running.checkpoint:
            a = running.assignment
            beat = Heartbeat((HeartbeatLease(task_id, a.lease_id, running.progress, running.checkpoint,
                                             running.checkpoint_record),))
            with contextlib.suppress(PanalError):
                await self.client.post("/v1/heartbeat", beat, HeartbeatReply.decode, timeout_s=10.0)
        await self.release(running.assignment)
        running.cancel.set()

    def queue_result(self, record: SignedRecord, ok: bool) -> None:
        """Keep a signed result in the outbox until the board answers for it; send it soon."""
        self.outbox.save(outbox_key(record), record)
        self.pending.append(record)
        self.flush.set()
        if ok:
            self.done += 1
        else:
            self.failed += 1

    def take_pending(self) -> list[SignedRecord]:
        """The pending results that fit in one request to the board (agent/daemon/result_batches.py);
        the rest wait for the next. A result that can never fit is replaced by a failed one saying so."""
        if self.pending:
            head = self.pending[0]
            replacement = too_large(self.client.identity, head, self.max_body_bytes)
            if replacement is not None:
                self.outbox.save(outbox_key(head), replacement)   # same task and lease: the same file
                self.pending[0] = replacement
            elif encoded_size(head) > self.max_body_bytes:   # not ours to re-sign (an outbox from elsewhere)
                log.error("dropping result %s for %s: it is over the board's request limit of %d bytes and "
                          "not signed by this agent", outbox_key(head), self.address.url, self.max_body_bytes)
                self.outbox.remove(outbox_key(head))
                self.pending.pop(0)
                return self.take_pending()
        taken, self.pending = take_batch(self.pending, self.max_body_bytes)
        return taken

    def refused_as_too_large(self, sent: list[SignedRecord]) -> None:
        """The board refused a request as too large (413): its limit is lower than we thought. Assume
        half the size sent, so the batches shrink until they pass (a lone result then becomes a failure)."""
        size = sum(encoded_size(record) for record in sent)
        self.max_body_bytes = max(MIN_MAX_BODY_BYTES, min(self.max_body_bytes, size // 2))
        log.warning("%s refused %d results (%d bytes) as too large: sending at most %d bytes at a time",
                    self.address.url, len(sent), size, self.max_body_bytes)

    async def learn_limits(self) -> None:
        """The board's request size limit (``GET /v1/limits``); a board that does not say keeps the default."""
        try:
            limits = await self.client.call("GET", "/v1/limits", retry=False, timeout_s=10.0)
        except PanalError as exc:
            log.info("%s publishes no limits (%s): results go in requests of at most %d bytes",
                     self.address.url, exc.message, self.max_body_bytes)
            return
        most = limits.get("max_body_bytes") if isinstance(limits, dict) else None
        if isinstance(most, int) and not isinstance(most, bool) and most >= MIN_MAX_BODY_BYTES:
            self.max_body_bytes = most

    def settle(self, sent: list[SignedRecord], outcomes: Sequence[ResultOutcome]) -> None:
        """Drop delivered results from the outbox; keep those the board did not answer for."""
        # The board answers one outcome per result, in order (two attempts of one task can travel
        # together, so matching by task id alone would be ambiguous).
        if len(outcomes) != len(sent):
            self.pending.extend(sent)
            return
        for record, outcome in zip(sent, outcomes, strict=True):
            key = outbox_key(record)
            if outcome.status == Outcome.REJECTED:
                log.warning("board %s rejected the result of task %s: %s", self.address.url, outcome.task_id,
                            outcome.error.message if outcome.error else "no reason given")
            self.outbox.remove(key)

    async def deliver(self, retry: bool) -> None:
        """Send the pending results now; on failure they stay pending (and in the outbox)."""
        sent = self.take_pending()
        try:
            reply = await self.client.post("/v1/results", ResultsRequest(tuple(sent)), ResultsReply.decode,
                                           retry=retry, timeout_s=15.0)
        except PanalError as exc:
            self.pending[:0] = sent
            if isinstance(exc, PayloadTooLarge) and sent:
                self.refused_as_too_large(sent)
            log.warning("results for %s kept in the outbox: %s", self.address.url, exc.message)
            if retry and not self.owner.stopping:
                asyncio.get_running_loop().call_later(max(1.0, self.client.breaker.retry_in()), self.flush.set)
            return
        self.settle(sent, reply.results)
        if self.pending:
            self.flush.set()   # the rest, in the next request

    # -- the loops --------------------------------------------------------------------------------
    async def register(self) -> None:
        """Register (again) with the capabilities advertised now; retries until the board answers."""
        while True:
            try:
                registered = await self.client.post("/v1/agents", self.registration(), Registered.decode)
                self.lease_ttl_s = float(registered.lease_ttl_s)
                if registered.standing:
                    self.standing = registered.standing
                self.max_poll_wait_s = float(registered.max_poll_wait_s)
                await self.learn_limits()
                self.registered = True
                log.info("registered with %s as %s", self.address.url, self.client.identity.id)
                return
            except PanalError as exc:
                log.warning("cannot register with %s: %s", self.address.url, exc.message)
                await asyncio.sleep(max(1.0, self.client.breaker.retry_in()))

    async def _lease_loop(self) -> None:
        owner = self.owner
        await self.register()
        # Heartbeats start once the board has told us its lease TTL.
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        while not owner.stopping:
            wait = max(self.cooldown_until - time.monotonic(), self.hold_off() if self.hold_off else 0.0)
            if wait > 0:
                await asyncio.sleep(wait)
            n = await owner.slots.reserve(owner.board_count)
            sent = self.take_pending()
            held = self.envelopes.held()   # pinned until this request's reply is resolved
            try:
                # With several boards, shorter polls: a slot held by an idle board's long-poll is a slot
                # a busy board cannot use.
                poll_wait_s = min(owner.settings.poll_wait_s, self.max_poll_wait_s)
                wait_s = poll_wait_s if owner.board_count <= 1 else min(poll_wait_s, 2.0)
                reply = await self.client.post("/v1/lease", LeaseRequest(n, wait_s, tuple(sent), held.have),
                                               LeaseReply.decode, timeout_s=wait_s + 15.0)
            except asyncio.CancelledError:
                self.pending[:0] = sent
                await owner.slots.release(n)
                raise
            except PanalError as exc:
                self.pending[:0] = sent
                await owner.slots.release(n)
                if exc.code == "not_registered":
                    await self.register()
                    continue
                if isinstance(exc, PayloadTooLarge) and sent:
                    self.refused_as_too_large(sent)
                    continue
                log.warning("lease from %s failed: %s", self.address.url, exc.message)
                await asyncio.sleep(max(1.0, self.client.breaker.retry_in()))
                continue
            self.settle(sent, reply.results)
            if self.pending:
                self.flush.set()
            if reply.standing:
                self.standing = reply.standing
            if reply.refused != self.refused:
                self.refused = reply.refused
                if self.refused:
                    log.warning("%s gives this agent no work: %s", self.address.url, self.refused)
            tasks, missing = held.resolve(reply.tasks)
            why: dict[str, str] = {}
            if missing:   # a big envelope is fetched, once per job; what cannot be is handed back
                self.fetching = {a.task_id: a for a in (*tasks, *missing)}
                try:
                    why = await self.fetch_envelopes(held, missing)
                finally:
                    self.fetching = {}
                fetched, missing = held.resolve(missing)
                tasks += fetched
            if missing:
                await owner.slots.release(len(missing))
                await self.hand_back_missing(missing, why)
                n -= len(missing)
            if self.refused and not tasks:
                await owner.slots.release(n)
                await asyncio.sleep(min(owner.settings.poll_wait_s, 10.0))  # quarantined: don't spin
                continue
            await owner.slots.release(n - len(tasks))
            if not tasks and reply.retry_after_s:   # nothing here for us: the board names the pause
                self.cooldown_until = max(self.cooldown_until,
                                          time.monotonic() + min(reply.retry_after_s, MAX_BOARD_PAUSE_S))
            if not tasks:
                await asyncio.sleep(0)  # let other boards' loops take the slot we just gave back
            for assignment in tasks:
                owner.start_task(self, assignment)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.lease_ttl_s / 4))
            if not self.running and not self.fetching:
                continue
            beat = Heartbeat(tuple(HeartbeatLease(tid, r.assignment.lease_id, r.progress, r.checkpoint or None,
                                                  r.checkpoint_record if r.checkpoint else None)
                                   for tid, r in self.running.items())
                             + tuple(HeartbeatLease(tid, a.lease_id)
                                     for tid, a in self.fetching.items() if tid not in self.running))
            try:
                reply = await self.client.post("/v1/heartbeat", beat, HeartbeatReply.decode, timeout_s=10.0)
            except PanalError as exc:
                log.warning("heartbeat to %s failed: %s", self.address.url, exc.message)
                continue
            for lost in reply.lost:
                running = self.running.get(lost.task_id)
                if running is not None:
                    log.warning("task %s no longer leased to us (%s): stopping it", lost.task_id, lost.reason.value)
                    running.lost = True
                    running.cancel.set()

    async def _flush_loop(self) -> None:
        while True:
            await self.flush.wait()
            self.flush.clear()
            # (a lease request about to go out carries them: it runs in the turns this yields)
            await asyncio.sleep(batch_window_s(len(self.running)))
            if self.pending:
                await self.deliver(retry=True)
