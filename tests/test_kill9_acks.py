"""`kill -9` of a real hub process at random points under load: every acknowledged submission and result is in its
SQLite file afterwards (the durability rule, with the store's inline commits, group commits and end-of-step writes).

Load: submitters' jobs of one task (committed inline when the writer is idle) and of 24 (through the writer
thread), an agent leasing and reporting over real TLS; an acknowledgement is counted only once its reply arrived.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
from conftest import Procs
from helpers import scaled, wait_for
from test_api import result
from test_chaos import Hub

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from security.identity import Identity
from security.tls import BoardAddress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


def manifest(n: int) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "acked"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n}}})


class Load:
    """Submitters and an agent against the hub until it dies; what was acknowledged, in the order it was."""

    def __init__(self, hub: Hub, agent: Identity) -> None:
        self.hub, self.agent = hub, agent
        self.jobs: list[str] = []
        self.results: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        address = BoardAddress.parse(self.hub.url)
        me = Identity.load(self.hub.user / "user.key")
        async with BoardClient(address, me, retry_for_s=0.5) as sub, \
                BoardClient(address, self.agent, retry_for_s=0.5) as agent:
            await asyncio.gather(*(self._submitting(sub, i) for i in range(3)), self._working(agent),
                                 return_exceptions=True)

    async def _submitting(self, sub: BoardClient, seed: int) -> None:
        rnd = random.Random(seed)
        me = Identity.load(self.hub.user / "user.key")
        while True:
            job = await submit(sub, make_envelope(me, manifest(24 if rnd.random() < 0.2 else 1)))
            self.jobs.append(str(job["id"]))

    async def _working(self, agent: BoardClient) -> None:
        while True:
            tasks = (await agent.call("POST", "/v1/lease", {"slots": 8, "wait_s": 1}))["tasks"]
            for task in tasks:
                reply = await agent.call("POST", f"/v1/tasks/{task['task_id']}/result",
                                         {"result": result(self.agent, task)})
                if reply["status"] == "accepted":
                    self.results.append(str(task["task_id"]))


def test_nothing_acknowledged_is_lost_when_the_hub_is_killed_at_random_points_under_load(
        tmp_path: Path, procs: Procs) -> None:
    hub = Hub(procs, tmp_path, tmp_path / "user")
    agent = Identity.generate()
    rnd = random.Random(19)
    acked_jobs: set[str] = set()
    acked_results: set[str] = set()
    for round_ in range(4):
        hub.start()
        if round_ == 0:
            hub.call("POST", "/v1/agents", {"public_key": agent.public.text(), "name": "a",
                                            "capabilities": {"kinds": ["sleep"], "features": [UNIT_PROOFS]}},
                     identity=agent)
        load = Load(hub, agent)
        load.thread.start()
        goal = rnd.randint(5, 120)
        wait_for(lambda: len(load.results) >= goal, "the load to get going", diagnose=procs.logs_text)  # noqa: B023
        hub.kill()                      # mid-load: replies on the wire, commits queued, writes inline
        load.thread.join(scaled(60))
        assert not load.thread.is_alive()
        acked_jobs |= set(load.jobs)
        acked_results |= set(load.results)
        stored_jobs = {r[0] for r in hub.rows("SELECT id FROM jobs")}
        stored_results = {r[0] for r in hub.rows("SELECT task_id FROM results")}
        assert acked_jobs <= stored_jobs, sorted(acked_jobs - stored_jobs)
        assert acked_results <= stored_results, sorted(acked_results - stored_results)
    assert len(acked_results) >= 20 and len(acked_jobs) >= 20
