"""Checkpoints with provenance: who wrote a checkpoint, for which task and attempt, of which blob.

A task's checkpoint is what a later attempt (often on another agent) resumes from, so a bad one
poisons every result after it. A checkpoint therefore travels as a record signed by the agent that
wrote it, over ``(task, job, attempt, sha256)``:

* the board accepts one only from the task's current lessee, for the attempt it holds
  (``hub/leases.py``), and keeps the record with the task;
* a resuming agent verifies it before it loads anything (``agent/daemon/execution.py``): a record
  that is missing, forged, for another task, from a later attempt, or naming another blob than the
  one handed over is ignored and the task starts afresh. A record of the *same* attempt is fine: a
  lease given back (a long pause, a drained agent) requeues the task without using an attempt, so
  the next lessee holds the attempt number its predecessor wrote the checkpoint under;
* a result that resumed from a checkpoint names the record in its own signed payload
  (``resumed_from``), so ``panal results --verify`` checks the whole chain offline and shows whose
  checkpoint the answer depends on.

What this cannot do: tell a correct checkpoint from a wrong one written by the lessee itself. It
makes the dependency visible and attributable (and replicated validation catches a wrong answer).
"""

from __future__ import annotations

from typing import Any

from security.errors import BadRequest, PanalError, Unauthorized
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["checkpoint_problem", "resumed_from", "sign_checkpoint", "verify_checkpoint"]

_TYPE = "panal/checkpoint"


def sign_checkpoint(identity: Identity, task_id: str, job_id: str, attempt: int, sha256: str) -> SignedRecord:
    """The record a lessee sends with a checkpoint it uploaded."""
    return SignedRecord.sign(identity, {"type": _TYPE, "task_id": task_id, "job_id": job_id,
                                        "attempt": attempt, "sha256": sha256})


def verify_checkpoint(record: SignedRecord, task_id: str, *, sha256: str | None = None,
                      attempt: int | None = None, before_attempt: int | None = None,
                      signer: str | None = None) -> dict[str, Any]:
    """The record's payload if it is a valid checkpoint record for ``task_id`` (and, when given, of
    blob ``sha256``, written at ``attempt`` or at an attempt before ``before_attempt``, by ``signer``);
    raises Unauthorized (forged) or BadRequest (not what it claims to be) otherwise."""
    payload = record.verify()
    if payload.get("type") != _TYPE:
        raise BadRequest("not a checkpoint record", code="bad_checkpoint")
    if payload.get("task_id") != task_id:
        raise BadRequest(f"the checkpoint record is for task {payload.get('task_id')}, not {task_id}",
                         code="bad_checkpoint")
    if sha256 is not None and payload.get("sha256") != sha256:
        raise BadRequest("the checkpoint record names another blob", code="bad_checkpoint")
    written = payload.get("attempt")
    if not isinstance(written, int) or isinstance(written, bool):
        raise BadRequest("the checkpoint record has no attempt", code="bad_checkpoint")
    if attempt is not None and written != attempt:
        raise BadRequest(f"the checkpoint record is of attempt {written}, the lease is attempt {attempt}",
                         code="bad_checkpoint")
    if before_attempt is not None and written >= before_attempt:
        raise BadRequest(f"the checkpoint record is of attempt {written}, not of one before {before_attempt}",
                         code="bad_checkpoint")
    if signer is not None and record.key.id != signer:
        raise Unauthorized(f"the checkpoint record is signed by {record.key.id}, not the lessee",
                           code="bad_checkpoint")
    return payload


def checkpoint_problem(result: dict[str, Any]) -> str | None:
    """For ``panal results --verify``: what is wrong with the checkpoint a signed result says it resumed
    from (None when it names none, or a valid one for its task, of its attempt or an earlier one)."""
    resumed = result.get("resumed_from")
    if resumed is None:
        return None
    try:
        record = SignedRecord.from_wire(resumed.get("record") if isinstance(resumed, dict) else None)
        attempt = result.get("attempt")
        verify_checkpoint(record, str(result.get("task_id")),
                          before_attempt=attempt + 1 if isinstance(attempt, int) else None)
    except PanalError as exc:
        return f"the checkpoint it resumed from does not verify: {exc.message}"
    return None


def resumed_from(result: dict[str, Any]) -> str | None:
    """The agent whose checkpoint a result resumed from: the checkpoint record's signer (whether that
    record verifies is :func:`checkpoint_problem`'s question)."""
    resumed = result.get("resumed_from")
    try:
        return SignedRecord.from_wire(resumed.get("record") if isinstance(resumed, dict) else None).key.id
    except PanalError:
        return None
