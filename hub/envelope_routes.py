"""``GET /v1/jobs/{job_id}/envelope``: a job's signed manifest for an agent holding a lease of one of its tasks.

A lease reply leaves out an envelope too big to inline (hub/envelopes.py); the agent fetches it here, once
per job. The body is one shared copy per job (msgpack), written in chunks with back-pressure, at most
``max_envelope_streams`` at once, ``max_envelope_streams_per_address`` from one source address, one per agent,
each within ``body_timeout_s`` and, after a grace, at ``min_envelope_read_bytes_per_s`` (hub/stream_slots.py:
slow readers on many keys hold a few slots for a while, not all of them for a minute): 10k agents woken by one
big job cost the hub a chunk per stream, not a reply per agent. A JSON client gets it encoded the usual way.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from hub.auth import Authenticator
from hub.board import Board
from hub.config import HubConfig
from hub.http import reply_type
from hub.ratelimit import source_key
from hub.stream_slots import ReadPace, StreamSlots
from jobs.wire import MSGPACK, encode_body
from security.errors import TooManyRequests

__all__ = ["CHUNK_BYTES", "add_envelope_routes"]

log = logging.getLogger(__name__)
#: a stream writes this much, then waits until the connection has taken it (aiohttp drains past 64 KiB)
CHUNK_BYTES = 64 * 1024


def add_envelope_routes(app: web.Application, board: Board, auth: Authenticator, config: HubConfig) -> None:
    slots = StreamSlots.from_config(config)
    pace = ReadPace.from_config(config)
    streaming: set[str] = set()   # agents with a stream open (or waiting for one): one each

    async def get_envelope(request: web.Request) -> web.StreamResponse:
        agent_id = await auth.agent(request, b"")
        entry = board.leased_envelope(agent_id, request.match_info["job_id"])
        if agent_id in streaming:   # (a JSON client too: its body is no smaller, and no less slow to read)
            raise TooManyRequests("one envelope at a time per agent", retry_after_s=1.0, code="envelope_busy")
        streaming.add(agent_id)
        try:
            async with slots.slot(source_key(request.remote)):   # waiting costs a request, not a body: it is shared
                content_type = reply_type(request)   # a JSON client's is encoded for it, within the same bounds
                data = memoryview(entry.encoded if content_type == MSGPACK
                                  else encode_body(entry.record.to_wire(), content_type))
                response = web.StreamResponse(headers={"Content-Type": content_type})
                response.content_length = len(data)
                started = asyncio.get_running_loop().time()
                await response.prepare(request)
                sent = 0
                try:
                    for at in range(0, len(data), CHUNK_BYTES):
                        sent = min(len(data), at + CHUNK_BYTES)
                        async with asyncio.timeout_at(started + pace.due_s(sent)):
                            await response.write(data[at:sent])
                    async with asyncio.timeout_at(started + pace.due_s(sent)):
                        await response.write_eof()
                except TimeoutError:
                    log.warning("agent %s (%s) took job %s's envelope too slowly (under %d of %d bytes by %.0f s): "
                                "connection closed", agent_id, request.remote, entry.job.id, sent, len(data),
                                pace.due_s(sent))
                    # the rest of the body can't follow: drop the connection and return (raising here would
                    # have aiohttp log a traceback per slow reader: a stranger's way to fill the hub's log)
                    if request.transport is not None:
                        request.transport.abort()
                return response
        finally:
            streaming.discard(agent_id)

    app.router.add_get("/v1/jobs/{job_id}/envelope", get_envelope)
