"""The per-board circuit breaker, and the client that honours it against a real dead port."""

from __future__ import annotations

import socket

import pytest
from helpers import FakeClock

from agent.client.board import BoardClient
from agent.client.breaker import Breaker, BreakerState
from security.errors import Unavailable
from security.identity import Identity
from security.tls import BoardAddress


def test_breaker_opens_probes_and_backs_off() -> None:
    clock = FakeClock()
    b = Breaker(threshold=3, cooldown_s=2, max_cooldown_s=8, clock=clock, name="board")
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == BreakerState.OPEN and not b.allow()
    clock.now = 2.1
    assert b.state == BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()      # a single probe at a time
    b.failure()                             # the probe failed: open again, cool-down doubled
    assert b.state == BreakerState.OPEN and b.cooldown_s == 4
    clock.now = 6.2
    assert b.allow()
    b.success()
    assert b.state == BreakerState.CLOSED and b.cooldown_s == 2


async def test_client_stops_calling_a_dead_board_once_the_breaker_opens() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    breaker = Breaker(threshold=2, cooldown_s=60)
    async with BoardClient(BoardAddress(f"http://127.0.0.1:{port}"), Identity.generate(), retry_for_s=0.3,
                           breaker=breaker) as client:
        for _ in range(2):
            with pytest.raises(Unavailable) as exc:
                await client.call("GET", "/v1/status")
            assert exc.value.code == "unavailable"
        with pytest.raises(Unavailable) as exc:
            await client.call("GET", "/v1/status")
        assert exc.value.code == "breaker_open" and "circuit breaker open" in exc.value.message
