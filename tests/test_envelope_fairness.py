"""Slow readers can't starve honest lessees of a big envelope (hub/stream_slots.py), over a real board and TLS.

A volunteer with many agent keys on one address, each a lessee reading its envelope stream slowly, once held
every ``max_envelope_streams`` slot for ``body_timeout_s``: an honest lessee's fetch from elsewhere waited
behind them and its lease ran out. Now one address holds at most ``max_envelope_streams_per_address`` of them,
and a stream slower than ``min_envelope_read_bytes_per_s`` after its grace is closed, its slot handed to
whoever waited longest. Sources are bound on 127.0.0.x, so each "address" is a real source address the board
sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import scaled
from test_api import registered, submitter
from test_envelope_route_limits import MIB, holding, slow_reader, slow_stream

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope
from hub.stream_slots import ReadPace, StreamSlots
from jobs.manifest import Manifest
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.wire import MSGPACK
from security.identity import Identity
from security.records import SignedRecord

pytestmark = [pytest.mark.timeout(scaled(240))]

SYBILS = "127.0.0.3"      # one volunteer's address, many keys
HONEST = "127.0.0.4"      # an honest lessee elsewhere


def big_sweep(units: int) -> Manifest:
    """``units`` sleeps with 12 MB of labels: an envelope bigger than every buffer between a slow reader and the
    board, with a task for each lessee."""
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job",
                               "metadata": {"name": "big", "labels": {"pad": "x" * 12 * MIB}},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * units}}})


async def lessees(hub: InProcessHub, n: int) -> tuple[str, list[tuple[BoardClient, Identity]]]:
    """A big job on the board and ``n`` agents each holding a lease of one of its tasks (its envelope left out)."""
    assert hub.server is not None
    user = await submitter(hub)
    try:
        job = (await hub.server.board.submit(make_envelope(user.identity, big_sweep(n)), user.identity.id))[0].id
    finally:
        await user.close()
    agents = []
    for _ in range(n):
        client, agent = await registered(hub)
        reply = await client.post("/v1/lease", LeaseRequest(1, 0.0, (), {}), LeaseReply.decode)
        assert [(t.job_id, t.envelope) for t in reply.tasks] == [(job, None)]   # 12 MB: to be fetched
        agents.append((client, agent))
    return job, agents


async def honest_fetch(hub: InProcessHub, agent: Identity, job: str, source: str) -> Any:
    """The fetch a real agent makes (hub/board_link.py), from ``source``; within a minute, far below the
    ``body_timeout_s`` the slow readers would otherwise hold their slots for."""
    assert hub.address is not None
    async with BoardClient(hub.address, agent, retry_for_s=1, local_address=source) as client:
        return await client.call("GET", f"/v1/jobs/{job}/envelope", retry=False, timeout_s=scaled(60),
                                 max_reply_bytes=16 * MIB, headers={"Accept": MSGPACK})


async def bytes_until_closed(reader: asyncio.StreamReader) -> int:
    """How much of its reply a stream got before the board closed it (read now, as fast as it comes)."""
    got = 0
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        async with asyncio.timeout(scaled(60)):
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
    return got


async def close_all(streams: list[asyncio.StreamWriter], clients: list[BoardClient]) -> None:
    for stream in streams:
        stream.close()
        with contextlib.suppress(Exception):
            await stream.wait_closed()
    for client in clients:
        await client.close()


async def test_slow_readers_on_one_address_leave_slots_for_an_honest_lessee_elsewhere(tmp_path: Path) -> None:
    # Two slots, one per address; no read pace (only the address cap is under test) and a 10-minute body limit:
    # without the cap, two of the three slow lessees hold both slots and the honest fetch never gets one.
    hub = InProcessHub(tmp_path, bind="0.0.0.0", registration="open", inline_envelope_bytes=256,
                       max_body_bytes=16 * MIB, max_envelope_streams=2, max_envelope_streams_per_address=1,
                       min_envelope_read_bytes_per_s=0, body_timeout_s=600.0, lease_ttl_s=600.0)
    await hub.start()
    streams: list[asyncio.StreamWriter] = []
    job, agents = await lessees(hub, 4)
    try:
        path = f"/v1/jobs/{job}/envelope"
        for _, sybil in agents[:3]:
            streams.append(await slow_reader(hub, sybil, path, source=SYBILS))
            await holding(hub, sybil, path)   # its stream is open, or waiting behind its address's own
        value = await honest_fetch(hub, agents[3][1], job, HONEST)
        manifest = SignedRecord.from_wire(value).verify()["manifest"]
        assert manifest["metadata"]["name"] == "big" and len(manifest["metadata"]["labels"]["pad"]) == 12 * MIB
    finally:
        await close_all(streams, [c for c, _ in agents])
        await hub.stop()


async def test_a_stream_read_below_the_pace_is_closed_and_its_slot_goes_to_the_lessee_waiting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # One slot, held by a lessee that reads nothing; the body limit is 10 minutes. The pace (1 MiB/s after 1 s)
    # closes it once the socket buffers are full, and the honest lessee waiting for the slot gets its envelope.
    hub = InProcessHub(tmp_path, inline_envelope_bytes=256, max_body_bytes=16 * MIB, max_envelope_streams=1,
                       min_envelope_read_bytes_per_s=float(MIB), envelope_read_grace_s=1.0,
                       body_timeout_s=600.0, lease_ttl_s=600.0)
    await hub.start()
    job, agents = await lessees(hub, 2)
    (_, sybil), (_, honest) = agents
    path = f"/v1/jobs/{job}/envelope"
    stream_reader, stream = await slow_stream(hub, sybil, path)
    try:
        await holding(hub, sybil, path)
        manifest = SignedRecord.from_wire(await honest_fetch(hub, honest, job, "127.0.0.1")).verify()["manifest"]
        assert len(manifest["metadata"]["labels"]["pad"]) == 12 * MIB
        # the slow stream was cut short, with one warning line and no traceback (a stranger's log filler)
        assert await bytes_until_closed(stream_reader) < 12 * MIB
        closed = [r for r in caplog.records if "too slowly" in r.getMessage()]
        assert closed and closed[0].levelno == logging.WARNING
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a slow reader logged an error"
    finally:
        await close_all([stream], [c for c, _ in agents])
        await hub.stop()


async def test_stream_slots_serve_an_address_over_its_cap_in_turn_and_forget_it_after() -> None:
    slots = StreamSlots(total=3, per_address=2)
    entered: list[str] = []
    release = asyncio.Event()

    async def stream(name: str, address: str) -> None:
        async with slots.slot(address):
            entered.append(name)
            await release.wait()

    tasks = [asyncio.create_task(stream(f"a{i}", "10.0.0.1")) for i in range(3)]
    tasks.append(asyncio.create_task(stream("b0", "10.0.0.2")))
    while len(entered) < 3:
        await asyncio.sleep(0)
    assert sorted(entered) == ["a0", "a1", "b0"]   # the third of 10.0.0.1 waits; 10.0.0.2 is not behind it
    assert slots.open_from("10.0.0.1") == 3
    release.set()
    await asyncio.gather(*tasks)
    assert entered[-1] == "a2" and slots.open_from("10.0.0.1") == slots.open_from("10.0.0.2") == 0
    assert slots._addresses == {}


def test_the_read_pace_gives_a_grace_then_an_average_rate_within_the_body_limit() -> None:
    pace = ReadPace(limit_s=60.0, grace_s=10.0, min_bytes_per_s=64 * 1024)
    assert pace.due_s(64 * 1024) == 10.0             # within the grace: the grace
    assert pace.due_s(64 * 1024 * 20) == 20.0        # after it: bytes / rate
    assert pace.due_s(64 * 1024 * 1000) == 60.0      # never past the body limit
    assert ReadPace(limit_s=60.0, grace_s=10.0, min_bytes_per_s=0).due_s(1) == 60.0
