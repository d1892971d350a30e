"""``POST /v1/jobs?wait=S``: submit to result in one request (the shorter path for one task).

The job is committed before the wait starts, so what the submitter was told survives a hub's `kill -9`: the
client's retry of the same envelope finds the job and waits again, and the result, once acknowledged to the
agent, is in the store after another kill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import InProcessHub, Procs
from helpers import scaled, wait_for_async
from test_chaos import Hub

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, run_job, submit
from agent.tools.bench_dispatch import SimAgent
from jobs.manifest import Manifest
from security.identity import Identity
from security.tls import BoardAddress


def manifest(n: int, name: str = "waited") -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n}}})


class Running:
    """A simulated agent (the real client, real signed results) answering every task at once."""

    def __init__(self, address: BoardAddress) -> None:
        self.agent = SimAgent(address, 2)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimAgent:
        await self.agent.register()
        self.task = asyncio.create_task(self.agent.run(self.stop))
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        await self.agent.client.close()


@pytest.fixture
async def served(tmp_path: Path, user: Identity) -> AsyncIterator[InProcessHub]:
    h = InProcessHub(tmp_path, max_long_polls=2)
    server = await h.start()
    await server.add_submitter(user.public, "u")
    yield h
    await h.stop()


async def test_a_submit_that_waits_is_answered_with_the_finished_job(served: InProcessHub, user: Identity) -> None:
    assert served.address is not None
    async with Running(served.address), BoardClient(served.address, user) as client:
        job = await submit(client, make_envelope(user, manifest(3)), wait_s=30)
    assert job["state"] == "succeeded" and job["tasks"] == {"done": 3}


async def test_a_submit_whose_wait_ends_first_is_answered_with_the_job_as_it_stands(
        served: InProcessHub, user: Identity) -> None:
    assert served.address is not None
    envelope = make_envelope(user, manifest(1))
    async with BoardClient(served.address, user) as client:
        job = await submit(client, envelope, wait_s=1)            # nobody runs it
        assert job["state"] == "queued"
        async with Running(served.address):
            final = await run_job(client, envelope, scaled(60))   # the same envelope: the same job, waited for
    assert final["id"] == job["id"] and final["state"] == "succeeded"


async def test_a_submit_finding_the_long_polls_full_is_answered_at_once(served: InProcessHub, user: Identity) -> None:
    assert served.address is not None and served.server is not None
    async with BoardClient(served.address, user) as client:
        waiting = [asyncio.create_task(submit(client, make_envelope(user, manifest(1, f"w{i}")), wait_s=30))
                   for i in range(2)]   # the hub's two long-poll slots
        await wait_for_async(lambda: served.server is not None and len(served.server.board.view.active_jobs()) == 2,
                             "both submits waiting")
        job = await submit(client, make_envelope(user, manifest(1, "third")), wait_s=30)
        assert job["state"] == "queued"   # committed and answered, not a 503 that would make the client retry
        assert not any(w.done() for w in waiting)   # (answered while the other two still wait)
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    assert served.server.board.is_active(job["id"])


@pytest.mark.slow
@pytest.mark.timeout(scaled(300))
async def test_a_waiting_submit_survives_a_hub_kill_and_its_result_another(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    hub = Hub(procs, tmp_path, user)
    hub.start()
    me = Identity.load(user / "user.key")
    address = BoardAddress.parse(hub.url)
    async with BoardClient(address, me, retry_for_s=scaled(120)) as client:
        waiting = asyncio.create_task(run_job(client, make_envelope(me, manifest(1)), scaled(200)))
        [(job_id,)] = await wait_for_async(lambda: hub.rows("SELECT id FROM jobs"), "the submitted job committed")
        hub.kill()        # the submit is waiting in the hub for its job: the hub dies under it
        hub.start()
        async with Running(address):
            final = await waiting   # its retry found the committed job and waited for it again
    assert final["id"] == job_id and final["state"] == "succeeded"
    hub.kill()            # the agent's result was acknowledged: it is in the store after a kill -9
    hub.start()
    hub.assert_done_exactly_once(job_id, 1)
