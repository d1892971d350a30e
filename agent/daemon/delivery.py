"""One board's results on their way back: from the outbox on disk to the board's answer for each.

Why its own part: a result must survive anything between the worker and the board (a crash, an outage, a board
that lowered its request limit), and that is bookkeeping apart from leasing: a result is in the outbox before it
is sent and leaves it only once the board answered for it; the pending ones go in batches that fit the board's
limit (agent/daemon/result_batches.py), riding along the next lease request or flushed on their own. The board
link (agent/daemon/board_link.py) owns one of these and hands it what its lease replies answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from agent.client.board import BoardClient
from agent.daemon.outbox import Outbox
from agent.daemon.result_batches import (
    DEFAULT_MAX_BODY_BYTES,
    MIN_MAX_BODY_BYTES,
    batch_window_s,
    encoded_size,
    take_batch,
    too_large,
)
from jobs.protocol_results import Outcome, ResultOutcome, ResultsReply, ResultsRequest
from security.errors import PanalError, PayloadTooLarge
from security.records import SignedRecord, decode

__all__ = ["ResultDelivery", "outbox_key"]

log = logging.getLogger(__name__)


def outbox_key(record: SignedRecord) -> str:
    """A result's outbox name: task and lease, so two attempts of one task never share a file."""
    try:
        payload = decode(record.payload)
    except PanalError:
        return "unreadable"
    return f"{payload.get('task_id')}.{payload.get('lease_id')}" if isinstance(payload, dict) else "unreadable"


class ResultDelivery:
    """The results one board has not answered for yet, and the loop that delivers them."""

    def __init__(self, client: BoardClient, url: str, outbox: Outbox, stopping: Callable[[], bool],
                 running: Callable[[], int]) -> None:
        self.client, self.url, self.outbox = client, url, outbox
        self._stopping = stopping   # the daemon is stopping: no retry scheduled
        self._running = running     # tasks running for this board now (the batch window grows with them)
        self.pending: list[SignedRecord] = outbox.load()
        self.flush = asyncio.Event()
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES   # the board's largest request (GET /v1/limits, or a 413)
        self.done = 0
        self.failed = 0

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
                          "not signed by this agent", outbox_key(head), self.url, self.max_body_bytes)
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
                    self.url, len(sent), size, self.max_body_bytes)

    async def learn_limits(self) -> None:
        """The board's request size limit (``GET /v1/limits``); a board that does not say keeps the default."""
        try:
            limits = await self.client.call("GET", "/v1/limits", retry=False, timeout_s=10.0)
        except PanalError as exc:
            log.info("%s publishes no limits (%s): results go in requests of at most %d bytes",
                     self.url, exc.message, self.max_body_bytes)
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
                log.warning("board %s rejected the result of task %s: %s", self.url, outcome.task_id,
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
            log.warning("results for %s kept in the outbox: %s", self.url, exc.message)
            if retry and not self._stopping():
                asyncio.get_running_loop().call_later(max(1.0, self.client.breaker.retry_in()), self.flush.set)
            return
        self.settle(sent, reply.results)
        if self.pending:
            self.flush.set()   # the rest, in the next request

    async def flush_loop(self) -> None:
        """Deliver the pending results when no lease request is about to carry them."""
        while True:
            await self.flush.wait()
            self.flush.clear()
            # (a lease request about to go out carries them: it runs in the turns this yields)
            await asyncio.sleep(batch_window_s(self._running()))
            if self.pending:
                await self.deliver(retry=True)
