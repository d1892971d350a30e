"""The envelope route's bounds hold for every client of it, over a real board and TLS: while a lessee's stream of
a big envelope is open (a slow reader: a small receive buffer, nothing read), that lessee gets no second body,
in msgpack or in JSON (a JSON body is no smaller and was once encoded and written outside every bound: no
per-agent cap, no stream cap, no time limit)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest
from conftest import InProcessHub
from helpers import scaled, wait_for_async
from test_api import raw, registered, submitter
from test_result_batches import _Owner

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope
from agent.daemon.board_link import BoardLink
from agent.daemon.outbox import Outbox
from hub.records import TaskState
from jobs.manifest import Manifest
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.wire import JSON, MSGPACK
from security.httpsig import sign_request
from security.identity import Identity

MIB = 1024 * 1024
pytestmark = [pytest.mark.timeout(scaled(240))]


async def slow_reader(hub: InProcessHub, agent: Identity, path: str,
                      source: str = "127.0.0.1") -> asyncio.StreamWriter:
    """Ask for ``path`` over TLS from ``source`` with a tiny receive buffer and never read the reply."""
    return (await slow_stream(hub, agent, path, source))[1]


async def slow_stream(hub: InProcessHub, agent: Identity, path: str,
                      source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`slow_reader`, with the reader of its reply (to read what the board sent, later)."""
    assert hub.address is not None
    host, port = "127.0.0.1", int(hub.address.url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost", limit=4096)
    headers = {**sign_request(agent, "GET", path, "", b""), "Accept": MSGPACK, "Host": f"{host}:{port}"}
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode())
    await writer.drain()
    return reader, writer


def big_job() -> Manifest:
    """One sleep with 12 MB of labels: an envelope bigger than every buffer between a slow reader and the board
    (a loopback socket's send buffer grows to 4 MB)."""
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job",
                               "metadata": {"name": "big", "labels": {"pad": "x" * 12 * MIB}},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0, 0.0]}}})


async def holding(hub: InProcessHub, agent: Identity, path: str) -> None:
    """Until ``agent``'s slow stream of ``path`` holds its slot: a second ask of it is refused as busy."""
    deadline = time.monotonic() + scaled(60)
    while (status := (await raw(hub, "GET", path, b"", again(agent, path, MSGPACK)))[0]) != 429:
        assert status == 200 and time.monotonic() < deadline, "the slow stream never held its slot"


def again(agent: Identity, path: str, accept: str) -> dict[str, str]:
    return {**sign_request(agent, "GET", path, "", b""), "Accept": accept}


async def test_a_lessee_with_an_envelope_stream_open_gets_no_second_body_in_json_either(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, inline_envelope_bytes=256, max_body_bytes=16 * MIB)
    await hub.start()
    try:
        lessee, agent = await registered(hub)
        user = await submitter(hub)
        try:
            assert hub.server is not None   # (in-process: aiohttp warns of a 12 MB request body sent as bytes)
            job = (await hub.server.board.submit(make_envelope(user.identity, big_job()), user.identity.id))[0].id
            reply = await lessee.post("/v1/lease", LeaseRequest(1, 0.0, (), {}), LeaseReply.decode)
            assert [(t.job_id, t.envelope) for t in reply.tasks] == [(job, None)]   # 12 MB: to be fetched
            path = f"/v1/jobs/{job}/envelope"
            stream = await slow_reader(hub, agent, path)
            try:
                await holding(hub, agent, path)
                status, body = await raw(hub, "GET", path, b"", again(agent, path, JSON))
                assert (status, body.get("error")) == (429, "envelope_busy")   # once: a 12 MB JSON body
            finally:
                stream.close()
                with contextlib.suppress(Exception):
                    await stream.wait_closed()
        finally:
            for client in (lessee, user):
                await client.close()
    finally:
        await hub.stop()


async def test_leases_waiting_for_an_envelope_fetch_are_heartbeated_and_outlive_a_slow_fetch(tmp_path: Path) -> None:
    # One stream slot, held by a lessee that never reads (until body_timeout_s): a real agent's fetch of the same
    # envelope waits behind it three times its lease's TTL. Its lease must still be its own when the task starts.
    hub = InProcessHub(tmp_path, inline_envelope_bytes=256, max_body_bytes=16 * MIB, max_envelope_streams=1,
                       body_timeout_s=6.0, lease_ttl_s=2.0, max_poll_wait_s=0.2)
    server = await hub.start()
    assert hub.address is not None
    sybil_client, sybil = await registered(hub)
    user = await submitter(hub)
    identity = Identity.generate()
    owner = _Owner(identity, slots=1)
    client = BoardClient(hub.address, identity, retry_for_s=1)
    link = BoardLink(owner, hub.address, client, Outbox(tmp_path / "outbox", hub.address.url))
    stream = None
    try:
        job = (await server.board.submit(make_envelope(user.identity, big_job()), user.identity.id))[0].id
        reply = await sybil_client.post("/v1/lease", LeaseRequest(1, 0.0, (), {}), LeaseReply.decode)
        assert [t.job_id for t in reply.tasks] == [job]
        path = f"/v1/jobs/{job}/envelope"
        stream = await slow_reader(hub, sybil, path)
        await holding(hub, sybil, path)
        link.start()
        await wait_for_async(lambda: owner.started, "the agent's task to start once its envelope came",
                             timeout_s=scaled(60))
        started = owner.started[0]
        task = server.board.view.task(started.task_id)
        assert task is not None and (task.state, task.lease_id) == (TaskState.LEASED, started.lease_id)
        assert started.envelope is not None and started.attempt == 1
    finally:
        if stream is not None:
            stream.close()
        await link.stop()
        for c in (sybil_client, user, client):
            await c.close()
        await hub.stop()
