"""The agent API of a board as typed records: what each request and reply between agent and board carries.

Every record ``encode``s to the map the wire has always carried (the same keys in the same order, so
agents and boards of the previous version interoperate) and ``decode``s a body once, at the edge (the
board's handlers, the agent's client), through :class:`~jobs.fields.Fields`: a body of the wrong shape
is one 400 naming the field (``leases[2].lease_id: expected text, got 5``). Past the edge code works
with these records only. Signed records stay :class:`~security.records.SignedRecord`; capability
reports are :class:`~jobs.requirements.Capabilities`.

The routes, with their request and reply records: ``POST /v1/agents`` (:class:`Registration`,
:class:`Registered`), ``POST /v1/lease`` (:class:`LeaseRequest`, :class:`LeaseReply`), ``POST /v1/results``
(:class:`ResultsRequest`, :class:`ResultsReply`), ``POST /v1/tasks/{task_id}/result`` (:class:`TaskResult`,
:class:`ResultOutcome`), ``POST /v1/heartbeat`` (:class:`Heartbeat`, :class:`HeartbeatReply`) and
``POST /v1/tasks/{task_id}/release`` (:class:`Release`, :class:`Released`).

A job's signed manifest (its *envelope*: ~9 bytes per sweep point, 900 KB for 100k tasks) crosses the wire once
per agent, not once per task: a lease request lists the envelopes the agent holds for this board
(:attr:`LeaseRequest.have`, job id -> :func:`envelope_digest`), and the board leaves ``envelope`` out of an
assignment whose job the agent holds, and out of every assignment of a reply but the first of each job. An agent
that sends no ``have`` (an older one) gets every envelope, as before.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from jobs.committed import UnitProof
from jobs.fields import Fields, field_error, shown
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK, encode_body
from security.errors import BadRequest, PanalError
from security.identity import PublicKey
from security.records import SignedRecord

__all__ = [
    "ENVELOPE_DIGEST_CHARS",
    "MAX_HAVE",
    "MAX_HAVE_JOB_ID",
    "Assignment",
    "Heartbeat",
    "HeartbeatLease",
    "HeartbeatReply",
    "LeaseReply",
    "LeaseRequest",
    "LossReason",
    "LostLease",
    "Outcome",
    "Registered",
    "Registration",
    "Release",
    "Released",
    "ResultItem",
    "ResultOutcome",
    "ResultsReply",
    "ResultsRequest",
    "TaskResult",
    "UnreadableResult",
    "envelope_digest",
]


class Outcome(StrEnum):
    """What the board made of a delivered result."""

    ACCEPTED = "accepted"      # the attempt is settled (an ok result is the answer, or a failure report)
    DUPLICATE = "duplicate"    # the same result was settled before: nothing changed
    PENDING = "pending"        # received and held until more replicas arrive
    REJECTED = "rejected"      # refused: see the error


class LossReason(StrEnum):
    """Why a heartbeat's lease is no longer the agent's."""

    LOST = "lost"              # it expired, or another agent holds the task now
    CANCELLED = "cancelled"    # the job was cancelled


def _signed(value: Any, path: str) -> SignedRecord:
    try:
        return SignedRecord.from_wire(value)
    except BadRequest as exc:
        raise field_error(path, exc.message) from exc


@dataclass(frozen=True, slots=True)
class UnreadableResult:
    """A delivered result that is no signed record: refused on its own, so one bad item of a batch
    never costs the agent the batch's other results."""

    raw: Any
    error: BadRequest

    def to_wire(self) -> Any:
        return self.raw


#: one item of a batch of delivered results
ResultItem = SignedRecord | UnreadableResult


def _results(fields: Fields, name: str) -> tuple[ResultItem, ...]:
    items: list[ResultItem] = []
    for path, raw in fields.items(name):
        try:
            items.append(_signed(raw, path))
        except BadRequest as exc:
            items.append(UnreadableResult(raw, exc))
    return tuple(items)


# -- registration -------------------------------------------------------------------------------------
#: bounds on what a registration stores (a name is shown on the status page; the report is kept per agent)
MAX_AGENT_NAME = 128
MAX_CAPABILITIES_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Registration:
    """An agent's key (the request is signed with it), its name and its capability report."""

    public_key: PublicKey
    name: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)

    def encode(self) -> dict[str, Any]:
        return {"public_key": self.public_key.text(), "name": self.name,
                "capabilities": dict(self.capabilities.raw)}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Registration:
        f = Fields(value, path)
        key_text = f.text("public_key")
        try:
            key = PublicKey.parse(key_text)
        except BadRequest as exc:
            raise field_error(f.at("public_key"), exc.message) from exc
        report = f.mapping("capabilities")
        if len(encode_body(report, MSGPACK)) > MAX_CAPABILITIES_BYTES:   # stored, re-sent with every re-registration
            raise BadRequest(f"{f.at('capabilities')}: a capability report is at most {MAX_CAPABILITIES_BYTES} bytes",
                             code="bad_capabilities", details={"field": f.at("capabilities")})
        slots = report.get("slots")
        if isinstance(slots, float) and not math.isfinite(slots):   # JSON's Infinity, NaN, 1e400
            raise BadRequest(f"{f.at('capabilities')}: slots: expected a finite number, got {slots}",
                             code="bad_capabilities", details={"field": f.at("capabilities")})
        try:
            caps = Capabilities.from_dict(report)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:   # int(inf): cores, a GPU's index
            raise BadRequest(f"{f.at('capabilities')}: malformed capability report: {exc}",
                             code="bad_capabilities", details={"field": f.at("capabilities")}) from exc
        name = f.optional_text("name") or ""
        if len(name) > MAX_AGENT_NAME:
            raise field_error(f.at("name"), f"an agent name is at most {MAX_AGENT_NAME} characters")
        return cls(key, name, caps)


@dataclass(frozen=True, slots=True)
class Registered:
    """The board's answer to a registration: the agent's id and the board's pacing, and the agent's
    standing (as in :class:`LeaseReply`), so an agent that starts paused still knows its credit."""

    agent_id: str
    lease_ttl_s: float = 30.0
    max_poll_wait_s: float = 20.0
    max_tasks_per_lease: int = 64
    standing: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agent_id": self.agent_id, "lease_ttl_s": self.lease_ttl_s,
                               "max_poll_wait_s": self.max_poll_wait_s, "max_tasks_per_lease": self.max_tasks_per_lease}
        if self.standing:   # absent when empty, as in LeaseReply
            out["standing"] = self.standing
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Registered:
        f = Fields(value, path)
        return cls(f.text("agent_id"), f.number("lease_ttl_s", 30.0), f.number("max_poll_wait_s", 20.0),
                   f.integer("max_tasks_per_lease", 64), f.mapping("standing"))


# -- leases -------------------------------------------------------------------------------------------
#: the most jobs a lease request may say it holds the envelope of (an agent keeps fewer per board)
MAX_HAVE = 64
#: the longest job id ``have`` may name (a board's ids are "j" + 20 hex digits)
MAX_HAVE_JOB_ID = 64
#: hex digits of an envelope digest: 64 bits. Only an honest board relies on it (to leave out an envelope the
#: agent holds); the agent resolves an envelope-less assignment from its own copy, never from the digest
ENVELOPE_DIGEST_CHARS = 16
_DIGEST = re.compile(f"[0-9a-f]{{{ENVELOPE_DIGEST_CHARS}}}")


def envelope_digest(record: SignedRecord) -> str:
    """A short name of one signed manifest envelope (key, signature and payload): what ``have`` lists, so a
    board whose job id now stands for another envelope sends that one rather than leaving it out."""
    h = hashlib.sha256(record.key.text().encode())
    h.update(record.sig)
    h.update(record.payload)
    return h.hexdigest()[:ENVELOPE_DIGEST_CHARS]


def _have(f: Fields) -> dict[str, str] | None:
    """``have``, checked strictly: a map of at most :data:`MAX_HAVE` job ids to envelope digests (absent: None,
    an agent that knows nothing of it)."""
    raw, at = f.raw("have"), f.at("have")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise field_error(at, f"expected a map of job id to envelope digest, got {shown(raw)}")
    if len(raw) > MAX_HAVE:
        raise field_error(at, f"at most {MAX_HAVE} jobs, got {len(raw)}")
    for job_id, digest in raw.items():
        if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_HAVE_JOB_ID:
            raise field_error(at, f"a job id is text of 1 to {MAX_HAVE_JOB_ID} characters, got {shown(job_id)}")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise field_error(f"{at}.{job_id}", f"expected an envelope digest of {ENVELOPE_DIGEST_CHARS} lowercase "
                                                f"hex digits, got {shown(digest)}")
    return dict(raw)


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Up to ``slots`` tasks, long-polling up to ``wait_s`` for the first; finished results ride along.

    ``have``: the envelopes the agent holds *for this board*, job id -> :func:`envelope_digest`; the board
    leaves those out of its assignments. None (absent on the wire): the agent wants every envelope, as
    agents before ``have`` did; an empty map: it holds none but reads assignments without one."""

    slots: int = 1
    wait_s: float = 0.0
    results: tuple[ResultItem, ...] = ()
    have: Mapping[str, str] | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slots": self.slots, "wait_s": self.wait_s,
                               "results": [r.to_wire() for r in self.results]}
        if self.have is not None:   # absent: the map an older board reads stays the same
            out["have"] = dict(self.have)
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> LeaseRequest:
        f = Fields(value, path)
        return cls(int(f.number("slots", 1)), f.number("wait_s", 0.0), _results(f, "results"), _have(f))


@dataclass(frozen=True, slots=True)
class Assignment:
    """A leased task as the agent is told of it. The agent checks ``kind`` and ``params`` against the
    submitter's signed ``envelope`` before it runs anything (the board only relays the work).

    ``envelope`` is None (absent on the wire) when the agent holds it: it said so in its request's ``have``,
    or an earlier assignment of the same reply carried it. The agent then takes it from what *this board*
    sent it before, and hands the task back if it holds none (agent/daemon/envelopes.py).

    ``proof``: of a committed job (jobs/committed.py, whose envelope signs a Merkle root instead of every unit),
    this unit's shard data and the sibling hashes that prove ``idx`` and ``params`` against the signed root."""

    task_id: str
    job_id: str
    idx: int
    lease_id: str
    attempt: int
    kind: str
    params: dict[str, Any]
    timeout_s: float
    lease_ttl_s: float
    envelope: SignedRecord | None
    checkpoint: str | None = None      # sha256 of a previous attempt's checkpoint blob, to resume from
    #: its writer's signed record (jobs/checkpoints.py): the agent verifies it before resuming
    checkpoint_record: SignedRecord | None = None
    proof: UnitProof | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "job_id": self.job_id, "idx": self.idx,
                               "lease_id": self.lease_id, "attempt": self.attempt, "kind": self.kind,
                               "params": self.params, "timeout_s": self.timeout_s, "lease_ttl_s": self.lease_ttl_s}
        if self.envelope is not None:   # left out when the agent holds it (LeaseRequest.have)
            out["envelope"] = self.envelope.to_wire()
        out["checkpoint"] = self.checkpoint
        if self.checkpoint_record is not None:
            out["checkpoint_record"] = self.checkpoint_record.to_wire()
        if self.proof is not None:   # absent: a job signed whole (an older agent reads the same map)
            out["proof"] = self.proof.encode()
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Assignment:
        f = Fields(value, path)
        raw, envelope, proof = f.raw("checkpoint_record"), f.raw("envelope"), f.raw("proof")
        return cls(f.text("task_id"), f.text("job_id"), f.integer("idx"), f.text("lease_id"), f.integer("attempt"),
                   f.text("kind"), f.mapping("params", required=True), f.number("timeout_s"),
                   f.number("lease_ttl_s"), _signed(envelope, f.at("envelope")) if envelope is not None else None,
                   f.optional_text("checkpoint"),
                   _signed(raw, f.at("checkpoint_record")) if raw is not None else None,
                   UnitProof.decode(proof, f.at("proof")) if proof is not None else None)


@dataclass(frozen=True, slots=True)
class ResultOutcome:
    """What the board made of one delivered result. A rejected one carries the board's error; on the
    agent's side that is a plain :class:`PanalError` with the board's code and message (the wire
    carries no error class)."""

    task_id: str
    status: Outcome
    error: PanalError | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "status": self.status.value}
        if self.error is not None:
            out.update(self.error.to_body())
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultOutcome:
        f = Fields(value, path)
        code, message = f.optional_text("error"), f.optional_text("message")
        error = None if code is None else PanalError(message or code, code=code, details=f.raw("details"))
        return cls(f.text("task_id"), f.choice("status", Outcome), error)


def _outcomes(f: Fields, name: str) -> tuple[ResultOutcome, ...]:
    return tuple(ResultOutcome.decode(item, path) for path, item in f.items(name))


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """The tasks leased (maybe none), an outcome per result that rode along, in order, and why the
    board gives this agent no work now (a lease gate such as quarantine), if it does not."""

    tasks: tuple[Assignment, ...] = ()
    results: tuple[ResultOutcome, ...] = ()
    refused: str | None = None
    #: the agent's standing on this board (hub/trust/): credit, invalid results, reputation per kind
    standing: dict[str, Any] = field(default_factory=dict)
    #: no work here for this agent now: wait this long before asking again (hub/pacing.py); None: at once
    retry_after_s: float | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": [t.encode() for t in self.tasks],
                               "results": [o.encode() for o in self.results], "refused": self.refused}
        if self.standing:   # absent when empty: the map an older agent reads stays the same
            out["standing"] = self.standing
        if self.retry_after_s is not None:   # likewise
            out["retry_after_s"] = self.retry_after_s
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> LeaseReply:
        f = Fields(value, path)
        return cls(tuple(Assignment.decode(item, at) for at, item in f.items("tasks")), _outcomes(f, "results"),
                   f.optional_text("refused"), f.mapping("standing"), f.optional_number("retry_after_s"))


# -- results ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResultsRequest:
    """Signed results delivered without asking for work."""

    results: tuple[ResultItem, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"results": [r.to_wire() for r in self.results]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultsRequest:
        return cls(_results(Fields(value, path), "results"))


@dataclass(frozen=True, slots=True)
class ResultsReply:
    """An outcome per delivered result, in order."""

    results: tuple[ResultOutcome, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"results": [o.encode() for o in self.results]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> ResultsReply:
        return cls(_outcomes(Fields(value, path), "results"))


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One task's signed result (the route names the task)."""

    result: SignedRecord

    def encode(self) -> dict[str, Any]:
        return {"result": self.result.to_wire()}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> TaskResult:
        f = Fields(value, path)
        return cls(_signed(f.raw("result"), f.at("result")))


# -- heartbeats and releases --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeartbeatLease:
    """A lease the agent still holds, with its task's progress and latest checkpoint blob."""

    task_id: str
    lease_id: str
    progress: float | None = None
    checkpoint: str | None = None
    #: the lessee's signature over (task, attempt, checkpoint digest): jobs/checkpoints.py
    checkpoint_record: SignedRecord | None = None
    proof: UnitProof | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "lease_id": self.lease_id}
        if self.progress is not None:
            out["progress"] = self.progress
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        if self.checkpoint_record is not None:
            out["checkpoint_record"] = self.checkpoint_record.to_wire()
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> HeartbeatLease:
        f = Fields(value, path)
        raw = f.raw("checkpoint_record")
        record = _signed(raw, f.at("checkpoint_record")) if raw is not None else None
        return cls(f.text("task_id"), f.text("lease_id"), f.optional_number("progress"), f.optional_text("checkpoint"),
                   record)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Extend these leases."""

    leases: tuple[HeartbeatLease, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"leases": [lease.encode() for lease in self.leases]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Heartbeat:
        return cls(tuple(HeartbeatLease.decode(item, at) for at, item in Fields(value, path).items("leases")))


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease of a heartbeat that is not the agent's any more: it should stop the task."""

    task_id: str
    reason: LossReason

    def encode(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "reason": self.reason.value}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> LostLease:
        f = Fields(value, path)
        return cls(f.text("task_id"), f.choice("reason", LossReason))


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """The board's lease TTL (the next heartbeat is due well before it) and the leases lost."""

    lease_ttl_s: float = 30.0
    lost: tuple[LostLease, ...] = ()

    def encode(self) -> dict[str, Any]:
        return {"lease_ttl_s": self.lease_ttl_s, "lost": [lost.encode() for lost in self.lost]}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> HeartbeatReply:
        f = Fields(value, path)
        return cls(f.number("lease_ttl_s", 30.0), tuple(LostLease.decode(item, at) for at, item in f.items("lost")))


@dataclass(frozen=True, slots=True)
class Release:
    """Give a lease back (the agent is shutting down): the task is requeued, no attempt used."""

    lease_id: str

    def encode(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Release:
        return cls(Fields(value, path).text("lease_id"))


@dataclass(frozen=True, slots=True)
class Released:
    released: str      # the task id

    def encode(self) -> dict[str, Any]:
        return {"released": self.released}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Released:
        return cls(Fields(value, path).text("released"))
