"""The agent API of a board as typed records: what each request and reply between agent and board carries.

Every record ``encode``s to the map the wire has always carried (the same keys in the same order, so
agents and boards of the previous version interoperate) and ``decode``s a body once, at the edge (the
board's handlers, the agent's client), through :class:`~jobs.fields.Fields`: a body of the wrong shape
is one 400 naming the field (``leases[2].lease_id: expected text, got 5``). Past the edge code works
with these records only. Signed records stay :class:`~security.records.SignedRecord`; capability
reports are :class:`~jobs.requirements.Capabilities`.

The routes, with their request and reply records: ``POST /v1/lease`` (:class:`LeaseRequest`, :class:`LeaseReply`,
here); ``POST /v1/agents`` (``Registration``, ``Registered``: :mod:`jobs.protocol_registration`); ``POST
/v1/results`` (``ResultsRequest``, ``ResultsReply``) and ``POST /v1/tasks/{task_id}/result`` (``TaskResult``,
``ResultOutcome``): :mod:`jobs.protocol_results`; ``POST /v1/heartbeat`` (``Heartbeat``, ``HeartbeatReply``) and
``POST /v1/tasks/{task_id}/release`` (``Release``, ``Released``): :mod:`jobs.protocol_upkeep`. This module is
the lease exchange, the board's hottest route.

A job's signed manifest (its *envelope*: ~9 bytes per sweep point, 900 KB for 100k tasks) crosses the wire once
per agent, not once per task: a lease request lists the envelopes the agent holds for this board
(:attr:`LeaseRequest.have`, job id -> :func:`envelope_digest`), and the board leaves ``envelope`` out of an
assignment whose job the agent holds, and out of every assignment of a reply but the first of each job. An agent
that sends no ``have`` (an older one) gets every envelope, as before.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.committed import UnitProof
from jobs.fields import Fields, field_error, shown, signed_field
from jobs.protocol_results import ResultItem, ResultOutcome, decode_outcomes, decode_results
from security.records import SignedRecord

__all__ = [
    "ENVELOPE_DIGEST_CHARS",
    "MAX_HAVE",
    "MAX_HAVE_JOB_ID",
    "Assignment",
    "LeaseReply",
    "LeaseRequest",
    "envelope_digest",
]


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
        return cls(int(f.number("slots", 1)), f.number("wait_s", 0.0), decode_results(f, "results"), _have(f))


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
                   f.number("lease_ttl_s"), signed_field(envelope, f.at("envelope")) if envelope is not None else None,
                   f.optional_text("checkpoint"),
                   signed_field(raw, f.at("checkpoint_record")) if raw is not None else None,
                   UnitProof.decode(proof, f.at("proof")) if proof is not None else None)


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
        return cls(tuple(Assignment.decode(item, at) for at, item in f.items("tasks")), decode_outcomes(f, "results"),
                   f.optional_text("refused"), f.mapping("standing"), f.optional_number("retry_after_s"))
