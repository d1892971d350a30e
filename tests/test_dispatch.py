"""Dispatch policies against the real board and SQLite store; GPUs are faked only in capability reports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from agent.tools.simulate import run_simulation
from hub.board import Board
from hub.config import HubConfig
from hub.dispatch import POLICIES, make_policy
from hub.dispatch.explain import human_duration
from hub.dispatch.predict import Predictor
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

NEW_POLICIES = ["fair-share", "best-fit", "fastest", "adaptive"]
# 2 * 4096^3 * 100 = 1.4e13 flops: ~0.7 s on an A100, ~3 s on a GTX 1060, ~69 s on a 200 GFLOPS laptop
WORK = {"size": 4096, "iterations": 100}


def gpu_caps(name: str, vram_gb: float, gflops: float, **extra: Any) -> dict[str, Any]:
    return {"memory_gb": 32, "cpu": {"cores": 8, "gflops_fp32": 200.0},
            "gpus": [{"name": name, "backend": "cuda", "vram_gb": vram_gb, "compute_capability": "8.0",
                      "gflops_fp32": gflops, "gflops_fp16": gflops}], **extra}


def cpu_caps(**extra: Any) -> dict[str, Any]:
    return {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 200.0}, **extra}


A100 = gpu_caps("A100", 40, 19_500)
GTX1060 = gpu_caps("GTX 1060", 6, 4_400)


class Hub:
    def __init__(self, tmp: Path, policy: str, **config: Any) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.board = Board(SqliteStore(tmp / "b.db"),
                           HubConfig(dispatch_policy=policy, retry_backoff_s=0, expiry_interval_s=3600, **config),
                           self.clock)
        self.users: dict[str, Identity] = {}

    def user(self, name: str) -> Identity:
        return self.users.setdefault(name, Identity.generate())

    async def agent(self, name: str, caps: dict[str, Any]) -> Identity:
        identity = Identity.generate()
        await self.board.register_agent(identity.public, name, Capabilities.from_dict(caps))
        return identity

    async def submit(self, n: int = 1, user: str = "u", params: dict[str, Any] | None = None,
                     **spec: Any) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "t"},
                                "spec": {"task": "matmul", "params": params or WORK,
                                         "sweep": {"seed": list(range(n))}, **spec}})
        job, _ = await self.board.submit(make_envelope(self.user(user), m), self.user(user).id)
        self.clock.now += 1
        return job.id

    async def lease(self, agent: Identity, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(agent.id, slots, 0)

    async def finish(self, agent: Identity, task: Assignment, wall_s: float, status: str = "ok") -> None:
        payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                   "attempt": task.attempt, "agent_id": agent.id, "status": status, "metrics": {"wall_s": wall_s}}
        if status != "ok":
            payload.update(error_class="device_lost", error="gone")
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        assert outcome.status == "accepted"

    def submitter_of(self, task: Assignment) -> str:
        job = self.board.view.job(task.job_id)
        assert job is not None
        owner = job.submitter_id
        return next(name for name, ident in self.users.items() if ident.id == owner)


HubFactory = Callable[..., Any]


@pytest.fixture
async def hubs(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Hub] = []

    async def make(policy: str, **config: Any) -> Hub:
        hub = Hub(tmp_path / f"h{len(started)}", policy, **config)
        (tmp_path / f"h{len(started)}").mkdir()
        await hub.board.start()
        started.append(hub)
        return hub

    yield make
    for hub in started:
        await hub.board.stop()


def test_every_policy_is_registered() -> None:
    for name in ["priority-fifo", *NEW_POLICIES]:
        assert make_policy(name).name == name
    assert set(POLICIES) == {"priority-fifo", *NEW_POLICIES}


@pytest.mark.parametrize("policy", ["fair-share", "adaptive"])
async def test_fair_share_does_not_starve_a_low_volume_submitter(hubs: HubFactory, policy: str) -> None:
    hub = await hubs(policy)
    await hub.submit(20, user="bulk")
    await hub.submit(2, user="small")
    agents = [await hub.agent(f"a{i}", GTX1060) for i in range(2)]
    got = [hub.submitter_of(t) for a in agents for t in await hub.lease(a)]
    assert sorted(got) == ["bulk", "small"]   # priority-fifo would give both to "bulk"


async def test_priority_fifo_baseline_serves_the_bulk_submitter_first(hubs: HubFactory) -> None:
    hub = await hubs("priority-fifo")
    await hub.submit(20, user="bulk")
    await hub.submit(2, user="small")
    agents = [await hub.agent(f"a{i}", GTX1060) for i in range(2)]
    assert [hub.submitter_of(t) for a in agents for t in await hub.lease(a)] == ["bulk", "bulk"]


async def test_fair_share_follows_weights(hubs: HubFactory) -> None:
    hub = await hubs("fair-share")
    heavy = hub.user("heavy")
    hub.board.config.submitter_weights[heavy.id] = 3.0
    await hub.submit(10, user="heavy")
    await hub.submit(10, user="light")
    agent = await hub.agent("big", {**GTX1060, "slots": 4})
    got = [hub.submitter_of(t) for t in await hub.lease(agent, slots=4)]
    assert sorted(got) == ["heavy", "heavy", "heavy", "light"]


async def test_best_fit_keeps_the_a100_for_the_40gb_task(hubs: HubFactory) -> None:
    hub = await hubs("best-fit")
    small = await hub.submit(1, requires={"device": "gpu"})
    big = await hub.submit(1, requires={"device": "gpu", "min_vram_gb": 32})
    a100, gtx = await hub.agent("a100", A100), await hub.agent("gtx", GTX1060)
    assert [t.job_id for t in await hub.lease(a100)] == [big]      # the older small job waits for the 1060
    assert await hub.lease(a100) == []                                # the 1060 is idle and runs it well
    assert [t.job_id for t in await hub.lease(gtx)] == [small]
    more = await hub.submit(1, requires={"device": "gpu"})
    assert [t.job_id for t in await hub.lease(a100)] == [more]     # the 1060 is busy: no idling


async def test_fastest_prefers_the_faster_agent_and_learns_observed_speed(hubs: HubFactory) -> None:
    hub = await hubs("fastest")
    laptop, a100 = await hub.agent("laptop", cpu_caps()), await hub.agent("a100", A100)
    first = await hub.submit(1)
    assert await hub.lease(laptop) == []            # ~69 s here, ~0.7 s on the idle A100
    [task] = await hub.lease(a100)
    assert task.job_id == first
    predictor = hub.board.policy.predictor
    assert isinstance(predictor, Predictor) and predictor.factor(a100.id, "matmul") == 1.0
    await hub.finish(a100, task, wall_s=500.0)      # the A100 is shared and slow in practice
    assert predictor.factor(a100.id, "matmul") > 100
    second = await hub.submit(1)
    assert await hub.lease(a100) == []
    assert [t.job_id for t in await hub.lease(laptop)] == [second]


async def test_fastest_uses_slow_agents_when_the_queue_is_long(hubs: HubFactory) -> None:
    hub = await hubs("fastest")
    laptop, a100 = await hub.agent("laptop", cpu_caps()), await hub.agent("a100", A100)
    await hub.submit(500)       # the A100 needs ~350 s for them all, longer than one task on the laptop
    assert len(await hub.lease(laptop)) == 1
    assert len(await hub.lease(a100, slots=4)) == 4


async def test_adaptive_avoids_an_agent_with_a_high_recent_error_rate(hubs: HubFactory) -> None:
    hub = await hubs("adaptive")
    bad, good = await hub.agent("bad", GTX1060), await hub.agent("good", GTX1060)
    await hub.submit(3, policy={"retries": 5})
    for _ in range(3):
        [task] = await hub.lease(bad)
        await hub.finish(bad, task, wall_s=1.0, status="failed")
    assert await hub.lease(bad) == []
    assert len(await hub.lease(good)) == 1
    hub.clock.now += 4 * 1800                       # the rate decays: it may try again later
    assert len(await hub.lease(bad)) == 1


async def test_adaptive_still_uses_a_flaky_agent_when_it_is_the_only_one(hubs: HubFactory) -> None:
    hub = await hubs("adaptive")
    bad = await hub.agent("bad", GTX1060)
    await hub.submit(4, policy={"retries": 5})
    for _ in range(3):
        [task] = await hub.lease(bad)
        await hub.finish(bad, task, wall_s=1.0, status="failed")
    assert len(await hub.lease(bad)) == 1


@pytest.mark.parametrize("policy", NEW_POLICIES)
async def test_deadline_excludes_a_slow_host(hubs: HubFactory, policy: str) -> None:
    hub = await hubs(policy)
    laptop = await hub.agent("laptop", cpu_caps())
    job_id = await hub.submit(1, policy={"deadline": "60s"})
    assert await hub.lease(laptop) == []
    [line] = hub.board.view.waiting_because(job_id)
    assert line.startswith("needs to finish within 59s: the fastest of 1 capable connected agents would take ~69s")
    gtx = await hub.agent("gtx", GTX1060)
    assert [t.job_id for t in await hub.lease(gtx)] == [job_id]


@pytest.mark.parametrize("policy", NEW_POLICIES)
async def test_availability_window_excludes_a_host_leaving_too_soon(hubs: HubFactory, policy: str) -> None:
    hub = await hubs(policy)
    leaving = await hub.agent("leaving", cpu_caps(available_until=hub.clock.now + 30))
    job_id = await hub.submit(1)
    assert await hub.lease(leaving) == []
    assert hub.board.view.waiting_because(job_id) == [
        "needs ~69s on the fastest capable agent: all 1 capable connected agents leave sooner "
        "(longest window left: 29s)"]
    staying = await hub.agent("staying", cpu_caps(available_until=hub.clock.now + 3600))
    assert len(await hub.lease(staying)) == 1


async def test_explain_waiting_keeps_requirement_clauses(hubs: HubFactory) -> None:
    hub = await hubs("best-fit")
    await hub.agent("gtx", GTX1060)
    job_id = await hub.submit(1, requires={"device": "gpu", "min_vram_gb": 16})
    assert hub.board.view.waiting_because(job_id) == [
        "needs min_vram_gb 16: 0 of 1 connected agents have it (largest: 6.0)"]
    await hub.agent("a100", A100)   # clause lines stay as jobs.requirements.explain has them; no time lines
    assert hub.board.view.waiting_because(job_id) == [
        "needs min_vram_gb 16: 1 of 2 connected agents has it (largest: 40.0)"]


def test_human_duration() -> None:
    assert [human_duration(s) for s in (45, 600, 7200, 5.5 * 3600, 3 * 86400)] == ["45s", "10m", "2h", "5.5h", "3d"]


def test_simulation_fair_share_beats_fifo_on_fairness_and_deadlines() -> None:
    fifo, fair = run_simulation(["priority-fifo", "fair-share"], seed=2)
    assert fifo["tasks"] == fair["tasks"] > 0
    assert fair["done"] + fair["failed"] == fair["tasks"]
    assert fair["deadline_misses"] < fifo["deadline_misses"]
    assert fair["jain"] > fifo["jain"]
