"""Fetching the envelopes a lease reply left out, from the board that sent the reply, within fixed bounds.

Why its own module: a board leaves a big envelope (or one it forgot) out of its assignments, and the agent asks it
for that job's envelope (``GET /v1/jobs/{id}/envelope``). The board may be lying, so every bound lives here: a job
id checked before it goes in a URL, at most :data:`MAX_ENVELOPE_BYTES` read per envelope, and one time limit
(:data:`ENVELOPE_FETCH_S`) for all of a reply's fetches, since the slots that reply holds wait meanwhile. What
cannot be fetched is handed back by the board link (agent/daemon/board_link.py), never run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from agent.client.board import BoardClient
from agent.daemon.envelopes import HeldEnvelopes
from jobs.protocol import Assignment
from security.errors import PanalError
from security.records import SignedRecord

__all__ = ["ENVELOPE_FETCH_S", "MAX_ENVELOPE_BYTES", "fetch_envelopes"]

#: how long fetching a lease reply's envelopes may take, all together (a big one, behind other agents' at a busy
#: board)
ENVELOPE_FETCH_S = 120.0
#: the most of a fetched envelope this agent reads: a board's own default request limit is 4 MiB, and an envelope
#: is no bigger than the submit that carried it; a lying board's endless body stops here (and the book holds at
#: most DEFAULT_BOOK_SIZE of these per board)
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
#: a job id this agent puts in a URL: a board's ids are "j" + 20 hex digits
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def fetch_envelopes(client: BoardClient, held: HeldEnvelopes, missing: Sequence[Assignment]) -> dict[str, str]:
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
            value = await client.call("GET", f"/v1/jobs/{job_id}/envelope", retry=False,
                                      timeout_s=left, max_reply_bytes=MAX_ENVELOPE_BYTES)
            held.add(job_id, SignedRecord.from_wire(value))
        except PanalError as exc:
            failed[job_id] = f"the board did not send it when asked: {exc.message}"
    return failed
