"""Black-hole quarantine and OOM-aware retries, on a real Board + SqliteStore with a controllable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.dispatch.priority_fifo import PriorityFifo
from hub.quarantine import Quarantine
from hub.records import TaskState
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.errors import BadRequest
from security.identity import Identity
from security.records import SignedRecord

CPU_SMALL = {"kinds": ["sleep"], "memory_gb": 4}
CPU_BIG = {"kinds": ["sleep"], "memory_gb": 32}


def manifest(n: int, retries: int = 9, **spec: Any) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "q"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n},
                                        "policy": {"retries": retries}, **spec}})


class Fleet:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.config = HubConfig(lease_ttl_s=10, retry_backoff_s=0, expiry_interval_s=3600, quarantine_window=6,
                                quarantine_min_attempts=4, quarantine_failure_ratio=0.75, quarantine_base_s=60,
                                quarantine_max_s=200, **settings)
        self.board = Board(SqliteStore(tmp / "q.db"), self.config, self.clock)
        self.quarantine = self.board.quarantine
        self.user = Identity.generate()
        self.agents: dict[str, Identity] = {}

    async def add(self, name: str, caps: dict[str, Any]) -> Identity:
        agent = self.agents[name] = Identity.generate()
        await self.board.register_agent(agent.public, name, Capabilities.from_dict(caps))
        return agent

    async def submit(self, m: Manifest) -> str:
        job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
        return job.id

    async def lease(self, name: str, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(self.agents[name].id, slots, 0)

    async def report(self, name: str, task: Assignment, ok: bool, error_class: str = "crashed") -> str:
        agent = self.agents[name]
        payload: dict[str, Any] = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                                   "attempt": task.attempt, "agent_id": agent.id,
                                   "status": "ok" if ok else "failed"}
        if not ok:
            payload.update(error_class=error_class, error=f"simulated {error_class}")
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        return outcome.status

    async def run(self, name: str, ok: bool, n: int = 1, error_class: str = "crashed") -> int:
        """Lease and settle up to ``n`` tasks one by one; how many the agent got."""
        got = 0
        for _ in range(n):
            tasks = await self.lease(name)
            if not tasks:
                break
            assert await self.report(name, tasks[0], ok, error_class) == "accepted"
            got += 1
        return got

    def refused(self, name: str) -> str | None:
        return self.board.agents[self.agents[name].id].refused


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    await f.board.start()
    await f.add("good", CPU_SMALL)
    await f.add("hole", CPU_SMALL)
    yield f
    await f.board.stop()


async def test_black_hole_is_quarantined_and_the_job_finishes_on_the_others(fleet: Fleet) -> None:
    job_id = await fleet.submit(manifest(20))
    assert await fleet.run("good", ok=True) == 1
    assert await fleet.run("hole", ok=False, n=10) == 4   # the 4th failure closes the gate
    assert await fleet.lease("hole") == []
    reason = fleet.refused("hole")
    assert reason is not None and "quarantined" in reason and "4 of its last 4" in reason and "crashed" in reason
    assert fleet.quarantine.quarantined(fleet.agents["hole"].id)
    # The healthy agent keeps working and finishes the job, retried tasks included.
    assert await fleet.run("good", ok=True, n=30) == 19
    assert fleet.refused("good") is None
    view = await fleet.board.job_view(job_id)
    assert view["state"] == "succeeded" and view["tasks"] == {"done": 20}
    [first, *rest] = fleet.quarantine.snapshot()
    assert first["agent"] == fleet.agents["hole"].id and first["quarantined"] and first["strikes"] == 1
    assert first["remaining_s"] == 60.0 and first["until"] == fleet.clock.now + 60
    assert [r["quarantined"] for r in rest] == [False]


async def test_cool_down_doubles_is_capped_and_release_is_automatic(fleet: Fleet) -> None:
    await fleet.submit(manifest(60))
    await fleet.run("good", ok=True)
    assert await fleet.run("hole", ok=False, n=10) == 4
    for strike, cooldown in enumerate((60, 120, 200, 200), 1):   # base 60 s, doubling, capped at 200 s
        assert f"cool-down {cooldown} s (strike {strike})" in (fleet.refused("hole") or "")
        fleet.clock.now += cooldown - 1
        assert await fleet.lease("hole") == [], f"released early from a {cooldown} s cool-down"
        fleet.clock.now += 1
        [task] = await fleet.lease("hole")          # released by itself: the gate opens again
        assert fleet.refused("hole") is None
        await fleet.report("hole", task, ok=False)  # ... and a relapse starts the next, longer one
        assert await fleet.run("hole", ok=False, n=10) == 3
    assert fleet.quarantine.snapshot()[0]["quarantines"] == 5


async def test_a_clean_window_after_release_forgives_earlier_strikes(fleet: Fleet) -> None:
    await fleet.submit(manifest(40))
    await fleet.run("good", ok=True)
    assert await fleet.run("hole", ok=False, n=10) == 4
    fleet.clock.now += 60
    assert await fleet.run("hole", ok=True, n=6) == 6      # a full window of good work
    assert await fleet.run("hole", ok=False, n=10) == 5    # 5 of the last 6 reach the 0.75 ratio
    assert "5 of its last 6 attempts failed" in (fleet.refused("hole") or "")
    assert "cool-down 60 s (strike 1)" in (fleet.refused("hole") or "")


async def test_healthy_agent_with_occasional_failures_is_never_quarantined(fleet: Fleet) -> None:
    await fleet.submit(manifest(40))
    await fleet.run("hole", ok=True)   # someone completes the job's tasks: failures count against "good"
    for _ in range(8):
        assert await fleet.run("good", ok=True, n=3) == 3
        assert await fleet.run("good", ok=False) == 1      # one in four fails: normal life
    assert fleet.refused("good") is None
    assert not any(row["quarantined"] for row in fleet.quarantine.snapshot())


async def test_a_job_that_fails_everywhere_quarantines_nobody(fleet: Fleet) -> None:
    """Its failures are the job's fault: nobody has ever completed one of its tasks."""
    job_id = await fleet.submit(manifest(4, retries=2))
    for _ in range(6):
        await fleet.run("good", ok=False, error_class="timeout")
        await fleet.run("hole", ok=False, error_class="timeout")
    assert fleet.refused("good") is None and fleet.refused("hole") is None
    assert (await fleet.board.job_view(job_id))["state"] == "failed"
    # Permanent failures (bad parameters) are never the agent's either.
    await fleet.submit(manifest(8, retries=0))
    await fleet.run("good", ok=True)
    assert await fleet.run("hole", ok=False, n=6, error_class="invalid_params") == 6
    assert await fleet.lease("hole") != []


async def test_agent_that_keeps_losing_its_leases_is_quarantined(fleet: Fleet) -> None:
    await fleet.submit(manifest(10))
    for _ in range(4):
        assert len(await fleet.lease("hole")) == 1
        fleet.clock.now += 11           # it never heartbeats: the lease expires
        await fleet.board.sweep()
    assert await fleet.lease("hole") == []
    assert "agent_lost x4" in (fleet.refused("hole") or "")
    assert await fleet.run("good", ok=True, n=20) == 10   # every lost task was requeued and runs elsewhere


async def test_quarantine_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="quarantine_failure_ratio"):
        Quarantine(HubConfig(quarantine_failure_ratio=1.5), FakeClock(1_000_000.0))
    with pytest.raises(BadRequest, match="quarantine_min_attempts"):
        Quarantine(HubConfig(quarantine_window=3, quarantine_min_attempts=5), FakeClock(1_000_000.0))
    off = Quarantine(HubConfig(quarantine_window=0), FakeClock(1_000_000.0))
    assert not off.enabled and off.snapshot() == []
    config = HubConfig.load(tmp_path / "none.yaml", env={"PANAL_HUB_QUARANTINE_BASE_S": "5"})
    assert config.quarantine_base_s == 5.0 and config.quarantine_max_s == 3600.0


# -- OOM-aware retries ---------------------------------------------------------------------------
@pytest.fixture
async def sized(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    await f.board.start()
    await f.add("small", CPU_SMALL)
    await f.add("big", CPU_BIG)
    yield f
    await f.board.stop()


async def test_oom_retry_goes_to_the_agent_with_more_memory(sized: Fleet) -> None:
    job_id = await sized.submit(manifest(2, retries=3))
    [first] = await sized.lease("small")
    assert await sized.report("small", first, ok=False, error_class="oom") == "accepted"
    # The small agent gets the other task, never the retry of the one that ran out of memory there.
    [other] = await sized.lease("small", slots=4)
    assert other.task_id != first.task_id
    assert await sized.lease("small", slots=4) == []
    [retry] = await sized.lease("big")
    assert retry.task_id == first.task_id and retry.attempt == 2
    await sized.report("big", retry, ok=True)
    await sized.report("small", other, ok=True)
    assert (await sized.board.job_view(job_id))["state"] == "succeeded"
    assert sized.board.memory_hint.tasks == {}
    # The hint wraps nothing: the board's policy is the configured one, whatever the hint holds back.
    assert isinstance(sized.board.policy, PriorityFifo)


async def test_oom_retry_is_not_held_back_when_no_bigger_agent_is_around(sized: Fleet) -> None:
    await sized.submit(manifest(1, retries=3))
    [task] = await sized.lease("big")
    await sized.report("big", task, ok=False, error_class="oom")   # the biggest machine failed: no better one
    [again] = await sized.lease("small")
    assert again.task_id == task.task_id
    await sized.report("small", again, ok=True)
    # Once a bigger agent goes offline, the small one may try rather than the task starving.
    await sized.submit(manifest(1, retries=3))
    [t2] = await sized.lease("small")
    await sized.report("small", t2, ok=False, error_class="oom")
    assert await sized.lease("small") == []
    sized.clock.now += 600                      # nobody heard from either agent for ten minutes ...
    [t2_again] = await sized.lease("small")     # ... and only the small one comes back
    assert t2_again.task_id == t2.task_id


async def test_gpu_oom_compares_vram_not_ram(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    await f.board.start()
    try:
        hint = f.board.memory_hint
        gpu = {"name": "g", "backend": "cuda", "vram_gb": 8}
        await f.add("gtx", {"kinds": ["sleep"], "memory_gb": 128, "gpus": [gpu]})
        await f.add("a100", {"kinds": ["sleep"], "memory_gb": 16, "gpus": [{**gpu, "vram_gb": 40}]})
        await f.submit(manifest(1, requires={"device": "gpu"}))
        [task] = await f.lease("gtx")
        await f.report("gtx", task, ok=False, error_class="oom")
        gtx_caps = f.board.agents[f.agents["gtx"].id].caps
        assert hint.needs_more_memory(task.task_id, gtx_caps)
        assert not hint.needs_more_memory(task.task_id, f.board.agents[f.agents["a100"].id].caps)
        # plenty of RAM does not help a GPU task that ran out of VRAM on the same GPU size
        assert hint.needs_more_memory(task.task_id, Capabilities.from_dict({"memory_gb": 512, "gpus": [gpu]}))
        assert await f.lease("gtx") == []
        [retry] = await f.lease("a100")
        assert retry.task_id == task.task_id
        leased = f.board.view.task(task.task_id)
        assert leased is not None and leased.state == TaskState.LEASED
    finally:
        await f.board.stop()
