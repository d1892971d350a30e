"""``GET /v1/jobs/{job_id}/envelope``: a job's signed manifest for an agent holding a lease of one of its tasks.

A lease reply leaves out an envelope too big to inline (hub/envelopes.py); the agent fetches it here, once
per job. The body is one shared copy per job (msgpack), written in chunks with back-pressure, at most
``max_envelope_streams`` at once and one per agent, each within ``body_timeout_s``: 10k agents woken by one
big job cost the hub a chunk per stream, not a reply per agent. A JSON client gets it encoded the usual way.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from hub.auth import Authenticator
from hub.board import Board
from hub.config import HubConfig
from hub.http import reply, reply_type
from jobs.wire import MSGPACK
from security.errors import TooManyRequests

__all__ = ["CHUNK_BYTES", "add_envelope_routes"]

log = logging.getLogger(__name__)
#: a stream writes this much, then waits until the connection has taken it (aiohttp drains past 64 KiB)
CHUNK_BYTES = 64 * 1024


def add_envelope_routes(app: web.Application, board: Board, auth: Authenticator, config: HubConfig) -> None:
    streams = asyncio.Semaphore(max(1, config.max_envelope_streams))
    streaming: set[str] = set()   # agents with a stream open (or waiting for one): one each

    async def get_envelope(request: web.Request) -> web.StreamResponse:
        agent_id = await auth.agent(request, b"")
        entry = board.leased_envelope(agent_id, request.match_info["job_id"])
        if reply_type(request) != MSGPACK:
            return reply(request, entry.record.to_wire())
        if agent_id in streaming:
            raise TooManyRequests("one envelope at a time per agent", retry_after_s=1.0, code="envelope_busy")
        streaming.add(agent_id)
        try:
            async with streams:   # waiting here costs a request, not a body: the body is shared
                data = memoryview(entry.encoded)
                response = web.StreamResponse(headers={"Content-Type": MSGPACK})
                response.content_length = len(data)
                await response.prepare(request)
                try:
                    async with asyncio.timeout(config.body_timeout_s):
                        for at in range(0, len(data), CHUNK_BYTES):
                            await response.write(data[at:at + CHUNK_BYTES])
                except TimeoutError:
                    log.warning("agent %s did not read job %s's envelope within %.0f s: connection closed",
                                agent_id, entry.job.id, config.body_timeout_s)
                    raise ConnectionResetError("envelope not read in time") from None
                await response.write_eof()
                return response
        finally:
            streaming.discard(agent_id)

    app.router.add_get("/v1/jobs/{job_id}/envelope", get_envelope)
