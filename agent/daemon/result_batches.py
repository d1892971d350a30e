"""Results on their way to a board in requests the board accepts.

A board refuses any request body over its ``max_body_bytes`` (413). Sending every pending result as
one batch would let a few honest but large results (or many small ones after an outage) make every
delivery fail, and since the outbox is on disk, forever. So a request carries only as many results as
fit under the board's limit, and a result that could never fit alone becomes a signed ``failed``
result saying why: the submitter learns what happened instead of waiting on a task that never ends.
"""

from __future__ import annotations

import logging

from jobs.errors import FailureClass
from jobs.wire import encode_body
from security.errors import PanalError
from security.identity import Identity
from security.records import SignedRecord, decode

__all__ = ["BATCH_WINDOW_S", "DEFAULT_MAX_BODY_BYTES", "ENVELOPE_BYTES", "MIN_MAX_BODY_BYTES", "batch_window_s",
           "encoded_size", "take_batch", "too_large"]

log = logging.getLogger(__name__)
#: assumed for a board that does not publish its limit (``GET /v1/limits``): a quarter of the hub's
#: default (4 MiB), so a board whose operator lowered it somewhat still takes our requests
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: room in a request for what is not a result (a lease request's other fields, msgpack framing)
ENVELOPE_BYTES = 4096
#: never assume a limit below this after a 413 (a failed result itself must always fit)
MIN_MAX_BODY_BYTES = 64 * 1024
#: how long a finished result waits for others (still running tasks ending about now) to share its request
BATCH_WINDOW_S = 0.005


def batch_window_s(still_running: int) -> float:
    """How long the results pending now wait before they go: a moment for company while other tasks run;
    none when nothing else runs (no result is coming: it would only wait, e.g. a one-task job's submitter)."""
    return BATCH_WINDOW_S if still_running else 0.0
#: the payload fields a too-large result keeps: which attempt of what it was, and when
_KEPT = ("task_id", "job_id", "lease_id", "attempt", "agent_id", "started_at", "finished_at", "environment",
         "unit", "params")


def encoded_size(record: SignedRecord) -> int:
    """Bytes this result adds to a request body (msgpack, as the board client sends it)."""
    return len(encode_body(record.to_wire()))


def take_batch(pending: list[SignedRecord], max_body_bytes: int) -> tuple[list[SignedRecord], list[SignedRecord]]:
    """(the results to send in one request, in order, the rest): as many as fit under the limit. A
    result too large to fit even alone is sent alone (the caller replaces it first: :func:`too_large`)."""
    budget = max_body_bytes - ENVELOPE_BYTES
    used = 0
    for i, record in enumerate(pending):
        used += encoded_size(record)
        if used > budget:
            cut = max(i, 1)
            return pending[:cut], pending[cut:]
    return list(pending), []


def too_large(identity: Identity, record: SignedRecord, max_body_bytes: int) -> SignedRecord | None:
    """A signed ``failed`` result replacing ``record`` when it can never fit in a request to the board
    (None when it fits). The same parameters would give the same result on any agent, so the failure
    is ``unsupported`` (not retried): outputs that large belong in blobs."""
    size = encoded_size(record)
    if size <= max_body_bytes - ENVELOPE_BYTES:
        return None
    try:
        payload = decode(record.payload)
    except PanalError:
        payload = None
    if not isinstance(payload, dict) or record.key.id != identity.id:
        return None   # not ours to re-sign; the caller drops it
    failed = {k: payload[k] for k in _KEPT if k in payload}
    failed.update(status="failed", metrics={}, notes=[], error_class=FailureClass.UNSUPPORTED.value,
                  error=f"the result is {size} bytes, more than this board accepts in one request "
                        f"({max_body_bytes} bytes, max_body_bytes): large outputs must go through blobs")
    log.warning("result of task %s is %d bytes, over the board's limit of %d: reporting it as failed",
                payload.get("task_id"), size, max_body_bytes)
    return SignedRecord.sign(identity, failed)
