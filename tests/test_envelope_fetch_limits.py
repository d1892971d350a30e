"""A lying board cannot fill an agent's memory through ``GET /v1/jobs/{id}/envelope``: the agent reads at most
:data:`~agent.daemon.envelope_fetch.MAX_ENVELOPE_BYTES` of a fetched envelope, whether the board sends an endless
body or declares a huge one, and hands the task back (the lying board here is a real HTTP server on loopback
that answers the fetch route with bytes, not an envelope)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.client.board import BoardClient
from agent.daemon import envelope_fetch
from agent.daemon.board_link import BoardLink
from agent.daemon.envelope_fetch import MAX_ENVELOPE_BYTES, fetch_envelopes
from agent.daemon.outbox import Outbox
from jobs.protocol import Assignment
from security.identity import Identity
from security.tls import BoardAddress

MIB = 1024 * 1024


class LyingBoard:
    """Answers every envelope fetch with up to ``total`` bytes of msgpack-typed junk, 1 MiB at a time; counts
    what the agent let it write before it went away."""

    def __init__(self, total: int, declared: int | None) -> None:
        self.total, self.declared = total, declared
        self.written = 0
        self.finished = False

    async def envelope(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/msgpack"})
        if self.declared is not None:
            response.content_length = self.declared
        await response.prepare(request)
        chunk = b"\xc4" * MIB
        try:
            while self.written < self.total:
                await response.write(chunk)
                self.written += len(chunk)
            self.finished = True
            await response.write_eof()
        except (ConnectionError, RuntimeError):   # the agent hung up
            pass
        return response


@pytest.fixture
async def lying_board() -> AsyncIterator[tuple[LyingBoard, BoardAddress, web.AppRunner]]:
    liar = LyingBoard(3 * MAX_ENVELOPE_BYTES, None)
    app = web.Application()
    app.router.add_get("/v1/jobs/{job_id}/envelope", liar.envelope)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield liar, BoardAddress.parse(f"http://127.0.0.1:{port}"), runner
    finally:
        await runner.cleanup()


def _envelope_less(job_id: str) -> Assignment:
    return Assignment("t1", job_id, 0, "lease", 1, "sleep", {"seconds": 0}, 10.0, 30.0, None)


@pytest.mark.parametrize("declared", [None, 1024 * MIB], ids=["endless", "declared_1_gib"])
async def test_an_agent_reads_at_most_max_envelope_bytes_of_a_lying_boards_envelope_and_refuses_it(
        tmp_path: Path, lying_board: tuple[LyingBoard, BoardAddress, web.AppRunner], declared: int | None) -> None:
    liar, address, _ = lying_board
    liar.declared = declared
    client = BoardClient(address, Identity.generate(), retry_for_s=1)
    link = BoardLink(object(), address, client, Outbox(tmp_path / "outbox", address.url))  # type: ignore[arg-type]
    try:
        held = link.envelopes.held()
        failed = await fetch_envelopes(link.client, held, [_envelope_less("jlie")])
    finally:
        await client.close()
    assert "jlie" in failed and "over the" in failed["jlie"], failed
    assert not liar.finished                  # the agent hung up rather than read the rest
    assert "jlie" not in link.envelopes       # nothing of it is held, so the task is handed back, never run


async def test_a_lying_board_that_never_answers_holds_a_replys_fetches_for_one_time_limit_not_one_per_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reply naming many jobs, each left out, each fetch answered never: the agent's slots for this board wait
    # once for ENVELOPE_FETCH_S, not once per job (64 jobs x 120 s would be two hours of slots other boards lose).
    monkeypatch.setattr(envelope_fetch, "ENVELOPE_FETCH_S", 1.0)
    asked: list[str] = []
    release = asyncio.Event()

    async def never(request: web.Request) -> web.StreamResponse:
        asked.append(request.match_info["job_id"])
        await release.wait()
        return web.Response(status=503)
    app = web.Application()
    app.router.add_get("/v1/jobs/{job_id}/envelope", never)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    address = BoardAddress.parse(f"http://127.0.0.1:{runner.addresses[0][1]}")
    client = BoardClient(address, Identity.generate(), retry_for_s=1)
    link = BoardLink(object(), address, client, Outbox(tmp_path / "outbox", address.url))  # type: ignore[arg-type]
    try:
        failed = await fetch_envelopes(link.client, link.envelopes.held(), [_envelope_less(f"j{i}") for i in range(3)])
    finally:
        release.set()
        await client.close()
        await runner.cleanup()
    assert sorted(failed) == ["j0", "j1", "j2"]
    assert asked == ["j0"], "asked again after the reply's time for fetches ran out"
