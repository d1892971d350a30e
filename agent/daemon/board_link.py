"""The daemon's link to one board: registration and the lease and heartbeat loops.

Lease (long-poll for work, carrying finished results on the way) and heartbeat (extends the leases of
running tasks and learns which were lost). The results on their way back, from the outbox to the board's
answer, are the link's :class:`~agent.daemon.delivery.ResultDelivery` (with its flush loop); envelopes a
reply left out are fetched by :func:`~agent.daemon.envelope_fetch.fetch_envelopes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.client.board import BoardClient
from agent.client.breaker import BreakerState
from agent.daemon.delivery import ResultDelivery
from agent.daemon.envelope_fetch import fetch_envelopes
from agent.daemon.envelopes import EnvelopeBook
from agent.daemon.hooks import CodeConsent, HoldOff, SubmitterCheck
from agent.daemon.outbox import Outbox
from agent.daemon.settings import DaemonSettings
from agent.daemon.slots import Slots
from jobs.protocol import Assignment, LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_upkeep import Heartbeat, HeartbeatLease, HeartbeatReply, Release, Released
from jobs.requirements import Capabilities
from security.errors import PanalError, PayloadTooLarge
from security.records import SignedRecord
from security.tls import BoardAddress

__all__ = ["MAX_BOARD_PAUSE_S", "MISSING_ENVELOPE_COOLDOWN_S", "UNTRUSTED_COOLDOWN_S", "BoardLink", "LinkOwner",
           "Running"]

log = logging.getLogger(__name__)
#: after handing back a task from an untrusted submitter, leave that board alone this long
UNTRUSTED_COOLDOWN_S = 30.0
#: after handing back tasks a board sent without an envelope we never had from it, leave that board alone this long
MISSING_ENVELOPE_COOLDOWN_S = 30.0
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


class BoardLink:
    """Everything the daemon keeps about one board, and the loops that talk to it."""

    def __init__(self, owner: LinkOwner, address: BoardAddress, client: BoardClient, outbox: Outbox, *,
                 trusted: SubmitterCheck | None = None, hold_off: HoldOff | None = None,
                 code: CodeConsent | None = None) -> None:
        self.owner = owner
        self.address = address
        self.client = client
        self.trusted = trusted            # None: trust the board's submitters (a WAN hub vouches)
        self.hold_off = hold_off          # None: lease again at once
        self.code = code or CodeConsent()  # whose own code (sandboxed kinds) runs from this board: nobody's
        self.cooldown_until = 0.0         # monotonic time before which we do not lease from it
        self.refused: str | None = None   # why the board gives us no work (quarantine), if it says
        self.standing: dict[str, Any] = {}   # credit, invalid results and reputation, as the board says
        self.running: dict[str, Running] = {}
        #: the results on their way back to this board (agent/daemon/delivery.py)
        self.results = ResultDelivery(client, address.url, outbox, lambda: owner.stopping,
                                      lambda: len(self.running))
        #: leased tasks not yet running: their reply waits for an envelope fetch (heartbeated meanwhile: a fetch
        #: behind other agents' at a busy board may outlast the lease)
        self.fetching: dict[str, Assignment] = {}
        self.envelopes = EnvelopeBook()   # what this board sent us, by its job ids (agent/daemon/envelopes.py)
        self.lease_ttl_s = 30.0
        self.max_poll_wait_s = 20.0       # the board's longest long-poll (it says so at registration)
        self.registered = False
        self._lease: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start leasing and flushing (heartbeats start once registered)."""
        self._lease = asyncio.create_task(self._lease_loop(), name=f"lease {self.address.url}")
        self._loops = [self._lease, asyncio.create_task(self.results.flush_loop(), name="flush")]

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
                "outbox": len(self.results.pending), "refused": self.refused, "done": self.results.done,
                "failed": self.results.failed,
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
                await self.results.learn_limits()
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
            sent = self.results.take_pending()
            held = self.envelopes.held()   # pinned until this request's reply is resolved
            try:
                # With several boards, shorter polls: a slot held by an idle board's long-poll is a slot
                # a busy board cannot use.
                poll_wait_s = min(owner.settings.poll_wait_s, self.max_poll_wait_s)
                wait_s = poll_wait_s if owner.board_count <= 1 else min(poll_wait_s, 2.0)
                reply = await self.client.post("/v1/lease", LeaseRequest(n, wait_s, tuple(sent), held.have),
                                               LeaseReply.decode, timeout_s=wait_s + 15.0)
            except asyncio.CancelledError:
                self.results.pending[:0] = sent
                await owner.slots.release(n)
                raise
            except PanalError as exc:
                self.results.pending[:0] = sent
                await owner.slots.release(n)
                if exc.code == "not_registered":
                    await self.register()
                    continue
                if isinstance(exc, PayloadTooLarge) and sent:
                    self.results.refused_as_too_large(sent)
                    continue
                log.warning("lease from %s failed: %s", self.address.url, exc.message)
                await asyncio.sleep(max(1.0, self.client.breaker.retry_in()))
                continue
            self.results.settle(sent, reply.results)
            if self.results.pending:
                self.results.flush.set()
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
                    why = await fetch_envelopes(self.client, held, missing)
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
