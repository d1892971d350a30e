"""The board client keeps no cookies: calls are signed, so a board has no use for them, and a jar costs every
call a lookup and every reply a parse on the one-task path. A board's ``Set-Cookie`` is never sent back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.client.board import BoardClient
from jobs.wire import MSGPACK, encode_body
from security.identity import Identity
from security.tls import BoardAddress


@pytest.fixture
async def cookie_board() -> AsyncIterator[tuple[TestServer, list[str | None]]]:
    sent: list[str | None] = []

    async def limits(request: web.Request) -> web.Response:
        sent.append(request.headers.get("Cookie"))
        response = web.Response(body=encode_body({}), content_type=MSGPACK)
        response.set_cookie("session", "planted-by-the-board")
        return response

    app = web.Application()
    app.router.add_get("/v1/limits", limits)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, sent
    await server.close()


async def test_a_cookie_a_board_sets_is_never_sent_back(cookie_board: tuple[TestServer, list[str | None]]) -> None:
    server, sent = cookie_board
    address = BoardAddress(f"http://localhost:{server.port}")   # (a jar keeps no cookie of a bare IP address)
    async with BoardClient(address, Identity.generate(), retry_for_s=1) as client:
        for _ in range(2):
            await client.call("GET", "/v1/limits")
    assert sent == [None, None]
