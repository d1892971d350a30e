"""Waking only who can run new work (hub/wakeups.py), handing on what a woken agent leaves, and the pause
an idle agent is told (hub/pacing.py) and keeps (agent/daemon/board_link.py).

Long-polls here wait up to an hour: a reply within a test can only come from a wake-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import FakeClock, wait_for_async

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.daemon.board_link import BoardLink
from agent.daemon.outbox import Outbox
from agent.daemon.settings import DaemonSettings
from agent.daemon.slots import Slots
from hub.board import Board
from hub.config import HubConfig
from hub.dispatch.classes import capability_class
from hub.pacing import PollPacing
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.protocol_registration import Registration
from jobs.requirements import Capabilities, Requirements, unmet
from security.identity import Identity

HOUR = 3600.0
GPU = {"gpus": [{"name": "GTX 1060", "backend": "cuda", "vram_gb": 6, "compute_capability": "6.1",
                 "gflops_fp32": 4400}]}


def sleep_job(n: int, **spec: Any) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "wake"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n}, **spec}})


class Fleet:
    """A real hub over TLS, a submitter, and agents whose long-polls run as tasks."""

    def __init__(self, hub: InProcessHub) -> None:
        self.hub = hub
        self.clients: list[BoardClient] = []
        self.polls: list[asyncio.Task[Any]] = []

    @property
    def board(self) -> Board:
        assert self.hub.server is not None
        return self.hub.server.board

    def client(self, identity: Identity) -> BoardClient:
        assert self.hub.address is not None
        client = BoardClient(self.hub.address, identity, retry_for_s=1)
        self.clients.append(client)
        return client

    async def agent(self, **caps: Any) -> BoardClient:
        identity = Identity.generate()
        client = self.client(identity)
        await client.call("POST", "/v1/agents", {"public_key": identity.public.text(), "name": "a",
                                                 "capabilities": {"kinds": ["sleep"], **caps}})
        return client

    def poll(self, client: BoardClient, slots: int = 1) -> asyncio.Task[Any]:
        task = asyncio.create_task(client.call("POST", "/v1/lease", {"slots": slots, "wait_s": HOUR}, timeout_s=HOUR))
        self.polls.append(task)
        return task

    async def parked(self, n: int) -> None:
        await wait_for_async(lambda: len(self.board._dispatcher.waiters) == n, f"{n} polls to park")

    async def submit(self, manifest: Manifest) -> None:
        assert self.hub.server is not None
        user = Identity.generate()
        await self.hub.server.add_submitter(user.public, "user")
        await submit(self.client(user), make_envelope(user, manifest))

    async def close(self) -> None:
        for poll in self.polls:
            poll.cancel()
        await asyncio.gather(*self.polls, return_exceptions=True)
        for client in self.clients:
            await client.close()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    hub = InProcessHub(tmp_path, max_poll_wait_s=HOUR)
    await hub.start()
    f = Fleet(hub)
    yield f
    await f.close()
    await hub.stop()


async def test_a_gpu_task_does_not_wake_cpu_only_waiters(fleet: Fleet) -> None:
    cpu_polls = [fleet.poll(await fleet.agent()) for _ in range(3)]
    gpu_poll = fleet.poll(await fleet.agent(**GPU))
    await fleet.parked(4)
    await fleet.submit(sleep_job(1, requires={"device": "gpu"}))
    await wait_for_async(gpu_poll.done, "the GPU agent's poll to answer")
    assert len(gpu_poll.result()["tasks"]) == 1
    assert fleet.board._dispatcher.waiters.woken == 1
    assert not any(p.done() for p in cpu_polls) and len(fleet.board._dispatcher.waiters) == 3


async def test_a_task_wakes_at_most_as_many_waiters_as_it_can_use(fleet: Fleet) -> None:
    polls = [fleet.poll(await fleet.agent()) for _ in range(10)]
    await fleet.parked(10)
    await fleet.submit(sleep_job(2))
    await wait_for_async(lambda: sum(p.done() for p in polls) == 2, "two polls to answer")
    assert sorted(len(p.result()["tasks"]) for p in polls if p.done()) == [1, 1]
    assert fleet.board._dispatcher.waiters.woken == 2 and len(fleet.board._dispatcher.waiters) == 8


async def test_a_waiter_with_more_slots_takes_what_would_wake_several(fleet: Fleet) -> None:
    wide = fleet.poll(await fleet.agent(slots=4), slots=4)
    narrow = [fleet.poll(await fleet.agent()) for _ in range(3)]
    await fleet.parked(4)
    await fleet.submit(sleep_job(4))
    await wait_for_async(wide.done, "the oldest poll, with four free slots, to answer")
    assert len(wide.result()["tasks"]) == 4 and fleet.board._dispatcher.waiters.woken == 1
    assert not any(p.done() for p in narrow)


async def test_the_longest_waiting_class_is_woken_first(fleet: Fleet) -> None:
    gpu_poll = fleet.poll(await fleet.agent(**GPU))
    await fleet.parked(1)
    cpu_poll = fleet.poll(await fleet.agent())
    await fleet.parked(2)
    await fleet.submit(sleep_job(1))            # either class may run it: the GPU agent has waited longer
    await wait_for_async(gpu_poll.done, "the older waiter to be served")
    assert not cpu_poll.done()
    await fleet.submit(sleep_job(1))
    await wait_for_async(cpu_poll.done, "the other class to be served next")


async def test_work_that_arrives_between_polls_is_found_by_the_next_one(fleet: Fleet) -> None:
    client = await fleet.agent()
    reply = await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0})
    assert reply["tasks"] == []
    await fleet.submit(sleep_job(1))             # nobody is parked: no wake-up reaches anyone
    assert fleet.board._dispatcher.waiters.woken == 0
    poll = fleet.poll(client)
    await wait_for_async(poll.done, "the next poll to find the task before it parks")
    assert len(poll.result()["tasks"]) == 1


async def test_an_agents_other_polls_answer_once_it_has_no_room(fleet: Fleet) -> None:
    client = await fleet.agent(slots=2)
    polls = [fleet.poll(client, slots=2) for _ in range(3)]
    await fleet.parked(3)
    await fleet.submit(sleep_job(2))
    await wait_for_async(lambda: all(p.done() for p in polls), "every poll of the full agent to answer")
    assert sorted(len(p.result()["tasks"]) for p in polls) == [0, 0, 2]


# -- hand-on: a woken waiter that takes nothing passes its share on (the real Board, its SQLite store) ----
async def test_a_woken_waiter_the_policy_passes_over_hands_the_task_on(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(dispatch_policy="fastest", max_poll_wait_s=HOUR), clock)
    await board.start()
    try:
        laptop, a100 = Identity.generate(), Identity.generate()
        await board.register_agent(laptop.public, "laptop", Capabilities.from_dict(
            {"kinds": ["matmul"], "memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 200.0}}))
        await board.register_agent(a100.public, "a100", Capabilities.from_dict(
            {"kinds": ["matmul"], "memory_gb": 64, "cpu": {"cores": 8, "gflops_fp32": 200.0},
             "gpus": [{"name": "A100", "backend": "cuda", "vram_gb": 40, "compute_capability": "8.0",
                       "gflops_fp32": 19_500, "gflops_fp16": 78_000}]}))
        waiters = board._dispatcher.waiters
        slow = asyncio.create_task(board.lease(laptop.id, 1, HOUR))    # parks first: the oldest waiter
        await wait_for_async(lambda: len(waiters) == 1, "the laptop to park")
        fast = asyncio.create_task(board.lease(a100.id, 1, HOUR))
        await wait_for_async(lambda: len(waiters) == 2, "the A100 to park")
        user = Identity.generate()
        manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "m"},
                                       "spec": {"task": "matmul", "params": {"size": 4096, "iterations": 100}}})
        await board.submit(make_envelope(user, manifest), user.id)
        # The laptop is woken first, and `fastest` keeps the task for the idle A100 (~0.7 s against ~69 s):
        # without the hand-on the A100 would sleep for the rest of its hour.
        [task] = await asyncio.wait_for(fast, 60)
        assert isinstance(task, Assignment) and waiters.woken == 2
        assert not slow.done() and len(waiters) == 1
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    finally:
        await board.stop()


# -- capability classes -------------------------------------------------------------------------------
def test_a_class_may_run_whatever_one_of_its_members_can() -> None:
    members = [Capabilities.from_dict({"kinds": ["matmul"], "memory_gb": m, "max_memory_gb": ceiling,
                                       "cpu": {"cores": 4, "gflops_fp32": cpu, "model": f"cpu {i}"},
                                       "gpus": [{"name": f"gpu {i}", "index": i, "backend": "cuda", "vram_gb": v,
                                                 "compute_capability": "8.6", "gflops_fp32": g}]})
               for i, (m, ceiling, cpu, v, g) in enumerate([(15.6, 5, 180, 7.8, 4400), (16.0, 5.5, 200, 8.0, 4600)])]
    [cls] = {capability_class(c).key: capability_class(c) for c in members}.values()   # one class for both
    for req in [Requirements(device="gpu", min_vram_gb=8), Requirements(min_memory_gb=16),
                Requirements(min_gflops=4500), Requirements(task_memory_gb=5.2), Requirements(device="gpu")]:
        if any(not unmet(req, "matmul", c) for c in members):
            assert cls.may_run(req, "matmul"), req
    assert not cls.may_run(Requirements(device="gpu", min_vram_gb=12), "matmul")
    assert not cls.may_run(Requirements(), "sleep")   # kinds stay exact


def test_cpu_and_gpu_agents_and_unknown_fields_make_different_classes() -> None:
    cpu = Capabilities.from_dict({"kinds": ["sleep"], "memory_gb": 16})
    gpu = Capabilities.from_dict({"kinds": ["sleep"], "memory_gb": 16, **GPU})
    consenting = Capabilities.from_dict({"kinds": ["sleep"], "memory_gb": 16, "consent": ["network"]})
    assert len({capability_class(c).key for c in (cpu, gpu, consenting)}) == 3
    assert not capability_class(cpu).may_run(Requirements(device="gpu"), "sleep")


# -- pacing ------------------------------------------------------------------------------------------
def test_the_pause_grows_with_the_fleet_and_small_fleets_ask_again_at_once() -> None:
    config = HubConfig(max_poll_wait_s=20, idle_polls_per_s=100, max_long_polls=2048, max_poll_interval_s=300)
    pacing = PollPacing(config, lambda: 0, lambda: 0.0)
    assert pacing.pause_s(20) == 0 and pacing.pause_s(1000) == 0
    assert 0 < pacing.pause_s(5000) < pacing.pause_s(10_000) < 300
    assert pacing.pause_s(50_000) == 300
    # 10k agents, each one long-poll (20 s) and one pause: at most half the long-poll cap parked at once,
    # and fewer than idle_polls_per_s requests a second
    cycle = config.max_poll_wait_s + pacing.pause_s(10_000)
    assert 10_000 * config.max_poll_wait_s / cycle <= config.max_long_polls / 2 + 1
    assert 10_000 / cycle <= config.idle_polls_per_s


def test_the_pause_is_jittered_within_its_bounds() -> None:
    config = HubConfig(min_poll_interval_s=10, max_poll_interval_s=300)
    pacing = PollPacing(config, lambda: 1, lambda: 0.0)
    told = {pacing.retry_after() for _ in range(200)}
    assert len(told) > 20 and all(t is not None and 10 <= t <= 12.5 for t in told)


class _Owner:
    """What a BoardLink needs of its daemon: slots, settings, a registration; leased tasks are noted."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.settings = DaemonSettings(poll_wait_s=HOUR)
        self.stopping = False
        self.slots = Slots(1, lambda: True)
        self.board_count = 1
        self.started: list[Assignment] = []

    def registration(self) -> Registration:
        return Registration(self.identity.public, "paced", Capabilities.from_dict({"kinds": ["sleep"]}))

    def start_task(self, link: BoardLink, assignment: Assignment) -> None:
        self.started.append(assignment)


async def test_the_agent_keeps_the_pause_its_board_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = InProcessHub(tmp_path, max_poll_wait_s=0.05, min_poll_interval_s=0.4, max_poll_interval_s=0.5)
    server = await hub.start()
    assert hub.address is not None
    board = server.board
    asked: list[float] = []
    told: list[tuple[float, float | None]] = []
    real_lease, real_pause = board.lease, board.retry_after

    async def lease(agent_id: str, slots: int, wait_s: float, have: Any = None) -> list[Assignment]:
        asked.append(time.monotonic())
        return await real_lease(agent_id, slots, wait_s, have)

    def retry_after(agent_id: str) -> float | None:
        pause = real_pause(agent_id)
        told.append((time.monotonic(), pause))
        return pause

    monkeypatch.setattr(board, "lease", lease)
    monkeypatch.setattr(board, "retry_after", retry_after)
    identity = Identity.generate()
    owner = _Owner(identity)
    client = BoardClient(hub.address, identity, retry_for_s=1)
    link = BoardLink(owner, hub.address, client, Outbox(tmp_path / "outbox", hub.address.url))
    link.start()
    try:
        await wait_for_async(lambda: len(asked) >= 4, "four lease requests")
        for (at, pause), next_ask in zip(told, asked[1:], strict=False):
            assert pause is not None and 0.4 <= pause <= 0.5
            assert next_ask - at >= pause, "the agent asked again before the pause its board named"
        assert link.max_poll_wait_s == 0.05   # as the board said at registration
    finally:
        await link.stop()
        await client.close()
        await hub.stop()


async def test_only_an_agent_the_board_has_nothing_for_is_paused(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(min_poll_interval_s=30), clock)
    await board.start()
    try:
        cpu = Identity.generate()
        await board.register_agent(cpu.public, "cpu", Capabilities.from_dict({"kinds": ["sleep"]}))
        user = Identity.generate()
        await board.submit(make_envelope(user, sleep_job(1, requires={"device": "gpu"})), user.id)
        assert await board.lease(cpu.id, 1, 0) == []
        pause = board.retry_after(cpu.id)            # a GPU task waits, but not for this agent
        assert pause is not None and 30 <= pause <= 37.5
        assert board.agents[cpu.id].quiet_until == clock.now + pause
        assert cpu.id in {a.row.id for a in board._dispatcher.context.connected()}   # paused, still around
        await board.submit(make_envelope(user, sleep_job(1)), user.id)
        assert board.retry_after(cpu.id) is None     # work its class may run waits: ask again at once
    finally:
        await board.stop()


async def test_fastest_does_not_count_a_paused_agent_as_free_now(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(dispatch_policy="fastest"), clock)
    await board.start()
    try:
        laptop, gpu = Identity.generate(), Identity.generate()
        await board.register_agent(laptop.public, "laptop", Capabilities.from_dict(
            {"kinds": ["matmul"], "cpu": {"cores": 4, "gflops_fp32": 200.0}}))
        await board.register_agent(gpu.public, "a100", Capabilities.from_dict(
            {"kinds": ["matmul"], "gpus": [{"name": "A100", "backend": "cuda", "vram_gb": 40,
                                            "gflops_fp32": 19_500}]}))
        board.agent(gpu.id).quiet_until = clock.now + 3600   # told to come back in an hour
        user = Identity.generate()
        manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "m"},
                                       "spec": {"task": "matmul", "params": {"size": 4096, "iterations": 100}}})
        await board.submit(make_envelope(user, manifest), user.id)
        # ~69 s on the laptop now beats ~0.7 s on the A100 in an hour
        assert len(await board.lease(laptop.id, 1, 0)) == 1
    finally:
        await board.stop()


def test_the_pause_travels_in_the_lease_reply_and_is_absent_when_none() -> None:
    from jobs.protocol import LeaseReply

    assert "retry_after_s" not in LeaseReply().encode()   # an older agent reads the same map
    assert LeaseReply.decode(LeaseReply(retry_after_s=42.5).encode()).retry_after_s == 42.5
    assert LeaseReply.decode({"tasks": [], "results": []}).retry_after_s is None


def test_adaptive_error_rates_flag_exactly_the_agents_above_the_limit() -> None:
    import random

    from hub.dispatch.adaptive import MAX_ERROR_RATE, ErrorRates

    rng = random.Random(3)
    rates, now = ErrorRates(half_life_s=600.0), 0.0
    agents = [f"a{i}" for i in range(30)]
    for _ in range(2000):
        now += rng.uniform(0, 60)
        agent = rng.choice(agents)
        rates.record(agent, "matmul", failed=rng.random() < (0.9 if agent < "a1" else 0.3), now=now)
        probe = now + rng.uniform(0, 3600)
        for other in agents:   # the fast path answers as the full rate would
            assert rates.high(other, "matmul", probe) == (rates.rate(other, "matmul", probe) > MAX_ERROR_RATE)


async def test_an_agent_re_registering_with_junk_reports_cannot_grow_the_hubs_memory(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered agent may re-register at will, and an unknown capability field is kept exactly in its
    class. Each new report used to leave its whole class key (the report) in the
    per-job match cache for ever (up to 64 KB each): one agent looping register + empty lease could exhaust
    the hub's memory."""
    import hub.wakeups
    monkeypatch.setattr(hub.wakeups, "_MATCHES_CACHED", 10)
    identity = Identity.generate()
    client = fleet.client(identity)
    await fleet.submit(sleep_job(1, requires={"device": "gpu"}))   # waiting work this CPU agent cannot run
    junk = 8_000
    for i in range(25):
        await client.call("POST", "/v1/agents", {"public_key": identity.public.text(), "name": "a",
                                                 "capabilities": {"kinds": ["sleep"], "junk": f"{i}" * junk}})
        reply = await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0})
        assert reply["tasks"] == []
    cache = fleet.board._dispatcher.waiters._match
    entries = sum(len(classes) for classes in cache.values())
    held = sum(len(key) for classes in cache.values() for key in classes)
    assert entries <= 10 + 1, entries
    assert held < junk, f"{held} characters of class keys held for one agent"
