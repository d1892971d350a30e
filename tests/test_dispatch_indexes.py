"""The indexes that let policies pick without scanning the fleet give the answers a scan from scratch gives.

Each test drives a real board (SQLite store, signed manifests and results) through the events that could
leave an index stale: agents that register again with another report, disconnect, hold a lease while silent,
leave at the end of their window, are told to pause, are refused by a gate, finish tasks (and so teach the
predictor how fast they really are). After each event the kept answers (who is connected, who has a free
slot, how many connected agents can run each job, how many of a job's tasks an agent should take under
``fastest``/``adaptive``) are compared with the same rule applied to every agent from scratch, the way the
policies computed them before the indexes existed.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock
from test_dispatch import A100, GTX1060, WORK, cpu_caps, gpu_caps

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.dispatch import covers, fit_index
from hub.dispatch.adaptive import Adaptive
from hub.dispatch.best_fit import WELL_FACTOR, WELL_S, BestFit
from hub.dispatch.fastest import Fastest, SoonestGate
from hub.dispatch.fit_index import asker_order, capability
from hub.dispatch.predict import candidate_jobs
from hub.fleet import AgentState, available_until, slots_of
from hub.pacing import PollPacing
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities, unmet
from security.identity import Identity
from security.records import SignedRecord

Avoid = Callable[[AgentState, str], bool] | None


class Refuse:
    """A lease gate that refuses the agents named in ``ids`` (a quarantine, say)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def refuse(self, agent: AgentState) -> str | None:
        return "quarantined" if agent.row.id in self.ids else None


class Fleet:
    def __init__(self, tmp: Path, policy: str) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.board = Board(SqliteStore(tmp / "b.db"),
                           HubConfig(dispatch_policy=policy, retry_backoff_s=0, expiry_interval_s=3600,
                                     lease_ttl_s=600, max_poll_wait_s=30), self.clock)
        self.gate = Refuse()
        self.board.add_gate(self.gate)
        self.user = Identity.generate()

    async def agent(self, name: str, caps: dict[str, Any], identity: Identity | None = None) -> Identity:
        identity = identity or Identity.generate()
        await self.board.register_agent(identity.public, name, Capabilities.from_dict(caps))
        return identity

    async def submit(self, n: int, **spec: Any) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "t"},
                                "spec": {"task": "matmul", "params": WORK, "sweep": {"seed": list(range(n))},
                                         **spec}})
        job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
        return job.id

    async def lease(self, agent: Identity, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(agent.id, slots, 0)

    async def finish(self, agent: Identity, task: Assignment, wall_s: float) -> None:
        payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                   "attempt": task.attempt, "agent_id": agent.id, "status": "ok", "metrics": {"wall_s": wall_s}}
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        assert outcome.status == "accepted"

    async def fail(self, agent: Identity, task: Assignment, error_class: str = "device_lost",
                   wall_s: float | None = 1.0) -> str:
        """The agent reports the task failed, its own fault (``adaptive``'s error rate for the kind rises); the
        board's verdict on the result (a lease taken back since is not accepted)."""
        payload: dict[str, Any] = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                                   "attempt": task.attempt, "agent_id": agent.id, "status": "failed",
                                   "error_class": error_class, "error": "x"}
        if wall_s is not None:
            payload["metrics"] = {"wall_s": wall_s}
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        return outcome.status

    # -- from scratch: the rules as the policies applied them to every agent ------------------------------
    def connected(self) -> set[str]:
        now, config = self.clock.now, self.board.config
        self.board._fleet.presence.observe(now)   # as the board does before it answers: a step back moves the times
        horizon = now - max(2 * config.max_poll_wait_s, config.lease_ttl_s) - 5
        back = now - config.max_poll_wait_s
        return {a.row.id for a in self.board.agents.values()
                if (a.running or a.last_seen >= horizon or a.quiet_until >= back)
                and ((until := available_until(a)) is None or until > now)}

    def share(self, agent: AgentState, job_id: str, avoid: Avoid) -> int:
        """SoonestGate.share as it was: every connected rival, no order, no bound."""
        context = self.board._dispatcher.context
        queues, predictor, now = context.queues, self.board.policy.predictor, self.clock.now
        assert predictor is not None
        job, req = queues.job(job_id), queues.requirements(job_id)
        task = predictor.head(queues, agent, job_id, now)
        if task is None:
            return 0
        my_end = now + predictor.predict(agent, job, task, req)
        ahead = 0
        for b_id in self.connected():
            b = self.board.agents[b_id]
            if b is agent or b.refused is not None or unmet(req, job.kind, b.caps) or (avoid and avoid(b, job.kind)):
                continue
            free = predictor.free_at(b, now)
            runtime = predictor.predict(b, job, task, req)
            if free >= my_end or runtime <= 0:
                continue
            n = covers.ceil_count((my_end - free) / runtime - 1e-9) - 1   # math.ceil, endless past a float
            end, until = free + runtime, available_until(b)
            if n <= 0 or (job.deadline_at is not None and end > job.deadline_at) or (until is not None and end > until):
                continue
            ahead += n
        return max(queues.queued(job_id) - ahead, 0)

    def check(self, untouched: bool = False) -> int:
        """Every kept answer equals its scratch computation; returns how many shares were compared.

        ``untouched``: each agent is asked of a copy of the kept covers, as they stand after the last event. Asked
        of the covers themselves, each agent checked takes its parts out (as its pick would) and the gates build
        covers afresh at this moment, so a part made stale by an event was mostly gone before an asker used it."""
        context, now = self.board._dispatcher.context, self.clock.now
        connected = self.connected()
        assert {a.row.id for a in context.connected()} == connected
        assert {a.row.id for a in context.idle()} == {
            i for i in connected if len(self.board.agents[i].running) < slots_of(self.board.agents[i])}
        policy = self.board.policy
        avoid: Avoid = None
        if isinstance(policy, Adaptive):
            errors = policy.errors
            avoid = lambda b, kind: errors.high(b.row.id, kind, now)   # noqa: E731
        assert isinstance(policy, Fastest | Adaptive)
        compared = 0
        for job_id in list(context.queues.waiting()):
            req, kind = context.queues.requirements(job_id), context.queues.job(job_id).kind
            capable = {a.row.id for a in self.board.agents.values() if not unmet(req, kind, a.caps)}
            assert context.capable(job_id) == capable
            assert context.capable_connected(job_id) == len(capable & connected)
        for agent in self.board.agents.values():
            # as a pick does: covers kept from earlier picks first hear what changed and forget the asker
            covers_now = copy.deepcopy(policy.covers) if untouched else policy.covers
            covers_now.begin(context)
            covers_now.forget(agent.row.id)
            kept = SoonestGate(context, agent, policy.predictor, now, policy.roster, avoid, covers_now)
            walked = SoonestGate(context, agent, policy.predictor, now, policy.roster, avoid)
            gates = [walked, kept, kept]   # kept twice: the second may answer from a new cover
            if policy.tally is not None:   # the sorted runtimes, as they stand (a copy when untouched), then the walk
                tally_now = copy.deepcopy(policy.tally, {id(policy.predictor): policy.predictor}) if untouched \
                    else policy.tally
                tally_now.begin(agent)
                gates.append(SoonestGate(context, agent, policy.predictor, now, policy.roster, avoid,
                                         tally=tally_now))
            for job_id in candidate_jobs(context.queues, agent):
                exact = self.share(agent, job_id, avoid)
                for need in (1, 3, 10**9):
                    for gate in gates:
                        assert gate.share(job_id, need) == min(exact, need), (agent.row.name, job_id, need)
                        compared += 1
        return compared


@pytest.fixture
async def fleets(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Fleet] = []

    async def make(policy: str) -> Fleet:
        directory = tmp_path / f"f{len(started)}"
        directory.mkdir()
        fleet = Fleet(directory, policy)
        await fleet.board.start()
        started.append(fleet)
        return fleet

    yield make
    for fleet in started:
        await fleet.board.stop()


def covers_only(f: Fleet) -> None:
    """The policy without its sorted runtimes (``tally.py``), which answer most questions before a cover is kept:
    the tests of covers and repairs (the tally's fallback) look at those."""
    policy = f.board.policy
    assert isinstance(policy, Fastest | Adaptive)
    policy.tally = None


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_kept_indexes_match_a_scan_from_scratch_through_fleet_events(fleets: Callable[..., Any],
                                                                           policy: str) -> None:
    f: Fleet = await fleets(policy)
    a100 = await f.agent("a100", A100)
    gtx = [await f.agent(f"gtx{i}", GTX1060) for i in range(3)]
    laptops = [await f.agent(f"laptop{i}", cpu_caps()) for i in range(2)]
    leaving = await f.agent("leaving", cpu_caps(available_until=f.clock.now + 900, slots=2))
    await f.submit(60)
    await f.submit(8, requires={"device": "gpu"})
    await f.submit(4, policy={"deadline": "20m"})
    f.check()
    held: dict[str, tuple[Identity, Assignment]] = {}
    for ident in [a100, *gtx, *laptops, leaving]:       # the fleet asks; some get work
        for task in await f.lease(ident, 2):
            held[task.task_id] = (ident, task)
    f.check()
    # results teach the predictor: the A100 turns out slow, a laptop far faster than it measured (quick)
    for ident, task in list(held.values()):
        if ident in (a100, laptops[0]):
            f.clock.now += 1
            await f.finish(ident, task, wall_s=500.0 if ident is a100 else 0.05)
            del held[task.task_id]
    f.check()
    # a GTX registers again as an A100-class card (a faster report), another loses its GPU
    await f.agent("gtx0", gpu_caps("A100", 40, 19_500), identity=gtx[0])
    await f.agent("gtx1", cpu_caps(), identity=gtx[1])
    assert f.check() > 0
    # a gate starts refusing a GTX (noted when it asks); another agent is told to pause
    f.gate.ids.add(gtx[2].id)
    assert await f.lease(gtx[2]) == []
    f.board.agent(laptops[1].id).quiet_until = f.clock.now + 120
    f.check()
    # time passes: the leaving agent's window ends; silent idle agents drop out, silent lessees stay
    f.clock.now += 700
    for ident in (a100, laptops[0]):
        await f.lease(ident)
    f.check()
    assert leaving.id not in f.connected()
    # the silent lessees' leases expire: they drop out; one comes back
    f.clock.now += 700
    await f.board.sweep()
    f.check()
    for task in await f.lease(gtx[0]):
        f.clock.now += 1
        await f.finish(gtx[0], task, wall_s=2.0)
    assert f.check() > 0


async def test_a_rival_faster_than_its_report_still_counts(fleets: Callable[..., Any]) -> None:
    """The early answer bounds the rivals not yet visited by their reported speed; one that has run far faster
    than that (a learned correction below FLOOR) is visited first, so a GTX 1060 still leaves the queue to it."""
    f: Fleet = await fleets("fastest")
    laptop = await f.agent("laptop", cpu_caps())
    await f.submit(1)
    [task] = await f.lease(laptop)                     # alone: it takes the task (~69 s predicted)
    await f.finish(laptop, task, wall_s=0.05)          # ... and ran it in 0.05 s
    gtx = await f.agent("gtx", GTX1060)
    await f.submit(30)
    f.check()
    assert await f.lease(gtx) == []                    # the laptop finishes ~44 of them before the GTX one
    assert len(await f.lease(laptop)) == 1


async def test_a_rival_that_registers_again_faster_moves_up_the_order(fleets: Callable[..., Any]) -> None:
    """A laptop that re-registers with an A100 report is visited as an A100: a slow asker then waits."""
    f: Fleet = await fleets("fastest")
    asker = await f.agent("asker", cpu_caps())
    upgraded = await f.agent("upgraded", cpu_caps())
    await f.submit(50)
    f.check()
    await f.agent("upgraded", A100, identity=upgraded)
    f.check()
    assert await f.lease(asker) == []                  # the A100 finishes ~98 before the laptop finishes one
    assert len(await f.lease(upgraded)) == 1


async def test_a_speed_claim_capped_by_the_board_leaves_the_capable_set(fleets: Callable[..., Any]) -> None:
    """The speed check replaces an over-claiming agent's report without a registration: the kept capable sets
    (and so ``fastest``'s rivals) must follow it."""
    f: Fleet = await fleets("fastest")
    liar = await f.agent("liar", A100)                 # claims 19,500 GFLOPS
    job_id = await f.submit(10, requires={"device": "gpu", "min_gflops": 10_000})
    assert liar.id in f.board._dispatcher.context.capable(job_id)
    for _ in range(3):
        [task] = await f.lease(liar)
        f.clock.now += 500                             # 1.4e13 FLOPs in 500 s: ~27 GFLOPS observed
        await f.finish(liar, task, wall_s=1.0)
    f.check()
    assert liar.id not in f.board._dispatcher.context.capable(job_id)
    assert await f.lease(liar) == []


async def covered_laptop(f: Fleet, a100_caps: dict[str, Any]) -> tuple[Identity, Identity]:
    """A laptop (~69 s a task) told to take none of 50 tasks because an idle A100 (~0.7 s) finishes ~97 of them
    first: the proof is kept as a cover for the next ask."""
    laptop, a100 = await f.agent("laptop", cpu_caps()), await f.agent("a100", a100_caps)
    await f.submit(50)
    assert await f.lease(laptop) == []
    policy = f.board.policy
    assert isinstance(policy, Fastest) and len(policy.covers) == 1
    return laptop, a100


async def test_a_kept_cover_drops_a_rival_a_gate_starts_refusing(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop, a100 = await covered_laptop(f, A100)
    f.gate.ids.add(a100.id)
    assert await f.lease(a100) == []                   # refused before any policy looks at it
    f.check()
    assert len(await f.lease(laptop)) == 1             # no rival left: the laptop takes one


async def test_a_kept_cover_drops_a_rival_that_went_silent(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop, _ = await covered_laptop(f, A100)
    f.clock.now += 700                                 # past the A100's seen horizon (605 s): not connected
    f.check()
    assert len(await f.lease(laptop)) == 1


async def test_a_kept_cover_drops_a_rival_whose_window_ends_before_its_task(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop, _ = await covered_laptop(f, {**A100, "available_until": 1_000_000.0 + 200})
    f.clock.now += 199.5                               # still connected, but a task would outlast its window
    f.check()
    assert len(await f.lease(laptop)) == 1


async def test_a_cover_built_from_a_deep_fleet_answers_as_the_walk(fleets: Callable[..., Any]) -> None:
    """Forty idle A100s: the first covers the queue, the walk goes on a while for parts quicker askers need,
    and the answer stays the walk's (none for the laptop, with or without the cover)."""
    f: Fleet = await fleets("fastest")
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(40):
        await f.agent(f"a100-{i}", A100)
    await f.submit(50)
    assert await f.lease(laptop) == []
    assert f.check() > 0
    assert await f.lease(laptop) == []


async def test_a_restarted_board_counts_a_silent_lessee_as_connected_until_its_lease_ends(tmp_path: Path) -> None:
    """After a restart the agents come from the store and their leases are restored: one last seen long ago
    but holding a lease is connected (as the scan says) until that lease expires."""
    first = Fleet(tmp_path, "fastest")
    await first.board.start()
    busy, idle = await first.agent("busy", GTX1060), await first.agent("idle", GTX1060)
    await first.submit(4)
    assert len(await first.lease(busy)) == 1
    await first.board.stop()
    again = Fleet(tmp_path, "fastest")
    again.clock.now = first.clock.now + 2000           # both silent for longer than the seen horizon
    await again.board.start()
    try:
        assert again.connected() == {busy.id}
        again.check()
        again.clock.now += 700                         # the restored lease (one TTL) expires
        await again.board.sweep()
        assert again.connected() == set()
        again.check()
        await again.lease(idle)
        assert again.connected() == {idle.id}
        again.check()
    finally:
        await again.board.stop()


async def test_a_kept_cover_drops_a_rival_that_registers_again_slower(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop, a100 = await covered_laptop(f, A100)
    await f.agent("a100", cpu_caps(), identity=a100)   # the same key, now a laptop: no faster than the asker
    f.check()
    assert len(await f.lease(laptop)) == 1


async def test_a_long_poll_that_outlives_the_seen_horizon_does_not_leave_a_ghost_member(
        fleets: Callable[..., Any]) -> None:
    """A lessee parked in a long poll while the clock steps past its seen horizon (an NTP step; the board's
    clock is wall time) is kept only by its lease; woken, it is seen again without a word to the presence
    index. Once its lease ends and it falls silent it must drop out: a member kept for ever would be a rival
    ``fastest`` counts to cover the queue, and a laptop would never be given the work (liveness)."""
    import asyncio

    f: Fleet = await fleets("fastest")
    ghost = await f.agent("ghost", {**A100, "slots": 2})
    await f.submit(1)
    assert len(await f.lease(ghost)) == 1
    poll = asyncio.create_task(f.board.lease(ghost.id, 1, 30))
    waiters = f.board._dispatcher.waiters
    while not len(waiters):
        await asyncio.sleep(0.01)
    f.clock.now += 700                                 # the clock steps past the ghost's horizon (605 s)
    laptop = await f.agent("laptop", cpu_caps())
    assert await f.lease(laptop) == []                 # a pick looks at the fleet: the ghost is kept by its lease
    await f.submit(1)                                  # wakes the ghost: it takes the task, seen now
    assert len(await poll) == 1
    f.clock.now += 601                                 # both leases expire; the ghost says nothing more
    await f.board.sweep()
    f.clock.now += 1000                                # long past its horizon: gone
    await f.submit(5)
    assert len(await f.lease(laptop)) == 1     # the ghost does not cover the queue
    f.check()


async def test_agents_that_never_ask_again_leave_the_fastest_order(fleets: Callable[..., Any]) -> None:
    """Every key ever registered stays in the fleet (a stranger's thousand keys under open registration, or a
    hub's history). The order ``fastest`` walks must hold only connected agents: with the gone ones in it, a
    laptop's every ask walked all of them (20,000 gone A100 keys: ~13 ms a pick, from 0.05 ms; hub/dispatch
    POLICIES.md). The answers stay the scan's as they leave, and as one of them comes back."""
    f: Fleet = await fleets("fastest")
    gone = [await f.agent(f"gone{i}", A100) for i in range(30)]
    f.clock.now += 700                                 # they never ask again
    laptop, a100 = await f.agent("laptop", cpu_caps()), await f.agent("a100", A100)
    await f.submit(50)
    assert await f.lease(laptop) == []                 # the A100 covers the queue
    policy = f.board.policy
    assert isinstance(policy, Fastest)
    assert {b_id for _, _, b_id in policy.roster.fastest_first()} == {laptop.id, a100.id}
    assert f.check() > 0
    await f.lease(gone[0])                             # one comes back, as a GTX: it joins the order again
    await f.agent("gone0", GTX1060, identity=gone[0])
    assert await f.lease(laptop) == []
    assert {b_id for _, _, b_id in policy.roster.fastest_first()} == {laptop.id, a100.id, gone[0].id}
    assert f.check() > 0


async def test_a_stored_report_with_infinite_slots_does_not_break_its_agents_asks(fleets: Callable[..., Any]) -> None:
    """A report stored before registration refused it (``slots: Infinity``) comes back at a restart: the
    free-slot index and the lease table read it as a report without slots, not as an OverflowError on every ask."""
    f: Fleet = await fleets("best-fit")
    odd = await f.agent("odd", {**cpu_caps(), "slots": float("inf")})
    await f.submit(2)
    assert len(await f.lease(odd, 2)) == 2
    assert await f.lease(odd) == []                    # asked again (seen: its free slots are looked at again)
    assert {a.row.id for a in f.board._dispatcher.context.connected()} == {odd.id}


async def test_jobs_that_ask_the_same_share_one_capable_set(fleets: Callable[..., Any]) -> None:
    """A submitter's many small jobs: one kept set of capable agents per distinct requirements, not per job
    (300 one-task jobs x 10,000 registered agents were 300 sets, ~150 MiB and a 17 s first pick). The sets
    still follow reports that change."""
    f: Fleet = await fleets("adaptive")
    gtx, laptop = await f.agent("gtx", GTX1060), await f.agent("laptop", cpu_caps())
    cpu_jobs = [await f.submit(1) for _ in range(3)]
    gpu_jobs = [await f.submit(1, requires={"device": "gpu"}) for _ in range(2)]
    context = f.board._dispatcher.context
    assert context.capable(cpu_jobs[0]) is context.capable(cpu_jobs[2])
    assert context.capable(gpu_jobs[0]) is context.capable(gpu_jobs[1]) != context.capable(cpu_jobs[0])
    f.check()
    await f.agent("laptop", GTX1060, identity=laptop)  # the laptop gets a GPU: both GPU jobs see it
    await f.agent("gtx", cpu_caps(), identity=gtx)     # the GTX loses its own
    assert context.capable(gpu_jobs[1]) == {laptop.id}
    f.check()


async def test_an_agent_advertising_more_slots_than_the_board_gives_absorbs_no_more_than_it_can_hold(
        tmp_path: Path) -> None:
    """best-fit leaves work to smaller idle agents; one advertising 1,000 slots on a board that leases at most 2
    to an agent is full at 2, so it must not count as absorbing the queue while the A100 waits (a lying
    volunteer could otherwise keep the big GPUs off every job it can run)."""
    clock = FakeClock(1_000_000.0)
    board = Board(SqliteStore(tmp_path / "b.db"),
                  HubConfig(dispatch_policy="best-fit", retry_backoff_s=0, expiry_interval_s=3600,
                            max_slots_per_agent=2), clock)
    await board.start()
    try:
        user, small, big = Identity.generate(), Identity.generate(), Identity.generate()
        await board.register_agent(small.public, "small", Capabilities.from_dict({**GTX1060, "slots": 1000}))
        await board.register_agent(big.public, "big", Capabilities.from_dict({**A100, "slots": 1}))
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "t"},
                                "spec": {"task": "matmul", "params": WORK, "sweep": {"seed": list(range(6))}}})
        await board.submit(make_envelope(user, m), user.id)
        assert len(await board.lease(small.id, 1000, 0)) == 2          # the board's cap, not its claim
        assert len(await board.lease(big.id, 1, 0)) == 1               # the small one is full: nobody absorbs
        assert slots_of(board.agents[small.id]) == 2
    finally:
        await board.stop()


def kept_covers(f: Fleet) -> list[Any]:
    """The covers the policy keeps now (one per group of like jobs)."""
    policy = f.board.policy
    assert isinstance(policy, Fastest | Adaptive)
    return list(policy.covers._groups.values())


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_like_jobs_share_one_cover_and_unlike_ones_do_not(fleets: Callable[..., Any], policy: str) -> None:
    """A rival that asks breaks one cover per group of like jobs, not one per job (200 jobs of ~50 kinds of
    work: 140 covers rebuilt in one pick before). Jobs are alike when their rivals' parts are the same numbers:
    the same requirements and kind, deadline and head-task cost. A deadline or another cost is another group."""
    f: Fleet = await fleets(policy)
    covers_only(f)
    laptop, a100 = await f.agent("laptop", cpu_caps()), await f.agent("a100", A100)
    for _ in range(3):
        await f.submit(30)
    assert await f.lease(laptop) == []
    assert len(kept_covers(f)) == 1                    # three jobs, one proof
    await f.submit(30, params={**WORK, "iterations": 150})
    await f.submit(30, policy={"deadline": "2h"})
    assert await f.lease(laptop) == []
    assert len(kept_covers(f)) == 3
    assert f.check() > 0
    await f.lease(a100)                                # the rival takes work: every group's cover loses it
    assert f.check() > 0


async def test_a_proof_for_a_quick_asker_follows_the_rivals_that_take_work(fleets: Callable[..., Any]) -> None:
    """An asker nearly as quick as its rivals: each finishes one task first, so saying "none" takes 140 parts,
    more than a question looks at one by one. The walk keeps the sum as a proof for that horizon and the next
    ask is answered from it; as rivals take work, their parts leave the proof, and once the rest no longer
    cover the queue the asker takes its share, as the scan says."""
    f: Fleet = await fleets("fastest")
    covers_only(f)
    asker = await f.agent("asker", gpu_caps("A100", 40, 12_000))
    rivals = [await f.agent(f"r{i}", A100) for i in range(150)]
    await f.submit(140)
    assert await f.lease(asker) == []
    [cover] = kept_covers(f)
    assert len(cover.parts) > 128 and cover.proofs and cover.proofs[0][1] >= 140
    assert await f.lease(asker) == []                  # from the proof
    assert kept_covers(f) == [cover]                   # not walked again
    for rival in rivals[:15]:                          # 15 take a task each (the walk visited 140 of them)
        assert len(await f.lease(rival)) == 1
    assert cover.proofs[0][1] == len(cover.parts) < 140   # one task each, less those that left
    f.check()
    for rival in rivals[15:30]:                        # 15 more: 110 queued, 120 free rivals, then fewer
        assert len(await f.lease(rival)) == 1
    assert await f.lease(asker) == []
    for i in range(30, 41):                            # 11 lose their GPU: 109 rivals for 110 tasks
        await f.agent(f"r{i}", cpu_caps(), identity=rivals[i])
    assert f.check() > 0
    assert len(await f.lease(asker)) == 1


async def test_a_repair_counts_again_a_rival_whose_part_was_taken_out(fleets: Callable[..., Any]) -> None:
    """An agent's parts leave every cover when it asks and when an attempt of its settles. Free again, it is most
    often a rival still: the next repair counts it afresh first, so the cover holds without a new walk."""
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop, a100 = await f.agent("laptop", cpu_caps()), await f.agent("a100", A100)
    gtx = await f.agent("gtx", GTX1060)
    await f.submit(110)
    assert await f.lease(laptop) == []                 # ~69 s a task: the A100 (~97 first) and the GTX (~21)
    [cover] = kept_covers(f)
    assert set(cover.parts) == {a100.id, gtx.id}
    [task] = await f.lease(gtx)                        # the GTX asks and takes one: it leaves the cover
    assert set(cover.parts) == {a100.id}
    f.clock.now += 3
    await f.finish(gtx, task, wall_s=3.1)
    assert await f.lease(laptop) == []                 # the A100 alone is short: the GTX is counted again
    assert kept_covers(f) == [cover] and set(cover.parts) == {a100.id, gtx.id}
    assert f.check() > 0


async def test_covers_hold_a_bounded_number_of_parts(fleets: Callable[..., Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Walks keep up to a thousand parts each for quick askers; all covers together hold at most ``PARTS_MAX``
    (a submitter's hundreds of unlike jobs on a fleet of thousands would otherwise keep jobs x agents parts):
    past it they start over, and the answers stay the scan's."""
    monkeypatch.setattr(covers, "PARTS_MAX", 20)
    f: Fleet = await fleets("fastest")
    covers_only(f)
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(12):
        await f.agent(f"a100-{i}", A100)
    for i in range(4):
        await f.submit(400, params={**WORK, "iterations": 100 + i})
    assert await f.lease(laptop) == []
    policy = f.board.policy
    assert isinstance(policy, Fastest)
    assert 0 < policy.covers._parts <= 20
    assert sum(len(cover.parts) for cover in kept_covers(f)) == policy.covers._parts
    assert f.check() > 0


# -- best-fit's absorbed counts (hub/dispatch/fit_index.py) ----------------------------------------------------
def fit_check(f: Fleet, walked: list[str] | None = None) -> int:
    """For every agent as the asker and every job it may run: the count ``best-fit`` reads from its kept trees
    equals the walk over every registered agent from scratch (the rule as the policy applied it before the
    index), for a short, a middling and an endless queue; returns how many counts were compared."""
    context, now = f.board._dispatcher.context, f.clock.now
    policy = f.board.policy
    assert isinstance(policy, BestFit)
    predictor, queues, connected = policy.predictor, context.queues, f.connected()
    compared = 0
    walked = [] if walked is None else walked
    # the most capable ask first: each sync judges its asker again (as a pick does), which must not be what
    # brings an agent's place up to date before a bigger asker counts it
    for agent in sorted(f.board.agents.values(), key=lambda a: asker_order(capability(a.caps)), reverse=True):
        jobs = candidate_jobs(queues, agent, context.capable)   # as a pick: the capable sets first, then sync
        policy.index.sync(context, agent, now)
        mine = capability(agent.caps)
        for job_id in jobs:
            job, req = queues.job(job_id), queues.requirements(job_id)
            task = predictor.head(queues, agent, job_id, now)
            if task is None:
                continue
            well = max(WELL_FACTOR * predictor.predict(agent, job, task, req), WELL_S)
            exact = sum(slots_of(b) - len(b.running) for b in f.board.agents.values()
                        if b.row.id in connected and len(b.running) < slots_of(b) and b is not agent
                        and b.refused is None and b.quiet_until <= now and capability(b.caps) < mine
                        and not unmet(req, job.kind, b.caps) and predictor.misfit(b, job, task, req, now) is None
                        and predictor.predict(b, job, task, req) <= well)
            capable = context.capable(job_id)
            tree = policy.index.tree(context, job_id, capable, set(), now)
            smaller = [b for b in context.idle() if b is not agent and b.refused is None and b.quiet_until <= now
                       and capability(b.caps) < mine]
            for need in (1, 3, 10**9):
                if tree is None:   # over the leaf budget: the policy walks the idle set
                    kept = policy.walk(smaller, agent, job, task, req, well, capable, need, now)
                    walked.append(job_id)
                else:
                    kept = policy.index.absorbed(tree, agent, job, task, req, well, need, now, context.idle_ids(),
                                                 capable, mine, asker_order(mine))
                assert min(kept, need) == min(exact, need), (agent.row.name, job_id, need, kept, exact)
                compared += 1
    return compared


def mid_gpu(i: int, **extra: Any) -> dict[str, Any]:
    """A spread of mid-range cards: no two alike in VRAM or speed (the tree's order and bounds differ)."""
    return gpu_caps(f"card{i}", 6 + i % 5 * 2, 3_000 + 700 * i, **extra)


async def fit_fleet(f: Fleet) -> dict[str, Identity]:
    agents = {"a100": await f.agent("a100", A100)}
    for i in range(10):
        agents[f"gpu{i}"] = await f.agent(f"gpu{i}", mid_gpu(i))
    for i in range(4):
        agents[f"cpu{i}"] = await f.agent(f"cpu{i}", cpu_caps(slots=1 + i % 2))
    agents["leaving"] = await f.agent("leaving", mid_gpu(11, available_until=f.clock.now + 900, slots=2))
    agents["short"] = await f.agent("short", mid_gpu(12, available_until=f.clock.now + 30))
    await f.submit(60)
    await f.submit(8, requires={"device": "gpu"})
    await f.submit(4, policy={"deadline": "20m"})
    await f.submit(6, requires={"device": "gpu", "min_vram_gb": 12})
    return agents


async def test_best_fit_kept_counts_match_the_walk_through_fleet_events(fleets: Callable[..., Any]) -> None:
    """Each event that changes who absorbs a job: agents becoming busy and idle again, learned speeds (slow
    enough to stop running a task "well"), a new report (bigger, smaller, no GPU), a gate's refusal and its end,
    a silent agent leaving and coming back, a window ending; the kept counts stay the walk's."""
    f: Fleet = await fleets("best-fit")
    agents = await fit_fleet(f)
    assert fit_check(f) > 0
    f.clock.now += 29.5                                              # "short" has 0.5 s left: too little
    assert fit_check(f) > 0
    held: dict[str, tuple[Identity, Assignment]] = {}
    for name in ("cpu0", "gpu3", "gpu7", "leaving", "a100"):        # some become busy (idle set shrinks)
        for task in await f.lease(agents[name], 2):
            held[task.task_id] = (agents[name], task)
    assert fit_check(f) > 0
    for ident, task in list(held.values()):                          # they finish: idle again; gpu3 learns
        f.clock.now += 1                                             # it is 100x slower than it measured
        await f.finish(ident, task, wall_s=400.0 if ident is agents["gpu3"] else 1.0)
        del held[task.task_id]
    assert fit_check(f) > 0
    await f.agent("gpu1", A100, identity=agents["gpu1"])            # registers again, bigger
    await f.agent("gpu8", cpu_caps(), identity=agents["gpu8"])      # loses its GPU
    await f.agent("cpu2", mid_gpu(2), identity=agents["cpu2"])      # gains one
    assert fit_check(f) > 0
    f.gate.ids.add(agents["gpu5"].id)                                # refused (noted when it asks)
    assert await f.lease(agents["gpu5"]) == []
    assert fit_check(f) > 0
    f.gate.ids.discard(agents["gpu5"].id)                            # no longer: it takes work in its own pick
    for task in await f.lease(agents["gpu5"]):
        held[task.task_id] = (agents["gpu5"], task)
    assert fit_check(f) > 0
    f.clock.now += 700                                               # silent ones drop out; the window ends
    for name in ("a100", "gpu0", "gpu2", "cpu1"):
        await f.lease(agents[name], 0)
    assert fit_check(f) > 0
    assert agents["leaving"].id not in f.connected()
    f.clock.now += 700
    await f.board.sweep()                                            # gpu5's lease expires: it drops out
    assert fit_check(f) > 0
    for task in await f.lease(agents["gpu5"]):                       # and comes back
        f.clock.now += 1
        await f.finish(agents["gpu5"], task, wall_s=2.0)
    assert fit_check(f) > 0


async def test_best_fit_counts_a_paused_agent_only_once_its_pause_ends(fleets: Callable[..., Any]) -> None:
    """An agent the board told to pause (nothing queued it can run) is around but not free: it absorbs nothing
    until its pause ends, then counts again without asking (the index puts it back from a heap of ends)."""
    f: Fleet = await fleets("best-fit")
    f.board._dispatcher.pacing = PollPacing(replace(f.board.config, min_poll_interval_s=60.0),
                                            lambda: len(f.board.agents), f.clock)
    a100, gtx, laptop = await f.agent("a100", A100), await f.agent("gtx", GTX1060), await f.agent("laptop", cpu_caps())
    await f.submit(1)
    assert fit_check(f) > 0                                          # the tree exists before the pause
    [task] = await f.lease(laptop)                                   # the only task: nothing left
    assert await f.lease(gtx) == []
    assert f.board.retry_after(gtx.id)                               # told to pause (as the lease endpoint asks)
    gtx_state = f.board.agents[gtx.id]
    assert gtx_state.quiet_until > f.clock.now
    await f.submit(5)                                                # work it could run arrives meanwhile
    assert fit_check(f) > 0
    f.clock.now = gtx_state.quiet_until                              # the pause ends: it counts again
    assert fit_check(f) > 0
    f.clock.now += 1
    await f.finish(laptop, task, wall_s=100.0)                       # idle again, and too slow to run it well
    assert fit_check(f) > 0
    assert len(await f.lease(a100, 5)) == 4                          # one of five left to the idle GTX ...
    assert len(await f.lease(gtx)) == 1                              # ... which takes it


async def test_best_fit_orders_reports_with_nan_as_the_walk_compared_them(fleets: Callable[..., Any]) -> None:
    """A report with NaN memory (JSON allows it) orders nothing: tuple comparison decides on the fields before
    the NaN. The tree places such agents (and cuts for such an asker) so that each count is still the walk's."""
    f: Fleet = await fleets("best-fit")
    for i in range(6):
        await f.agent(f"gpu{i}", mid_gpu(i))
        await f.agent(f"nan-vram{i}", gpu_caps("odd", float("nan"), 3_000 + 900 * i))
        await f.agent(f"cpu{i}", {"memory_gb": 16 + i, "cpu": {"cores": 64, "gflops_fp32": 1_500.0 + i}})
    await f.agent("nan-ram", {**mid_gpu(3), "memory_gb": float("nan")})
    await f.agent("nan-ram-tie", {**mid_gpu(3), "memory_gb": float("nan")})
    await f.agent("nan-cpu", {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": float("nan")}})
    await f.agent("nan-cpu-ram", {"memory_gb": float("nan"), "cpu": {"cores": 64, "gflops_fp32": 1_502.0}})
    await f.submit(40)
    await f.submit(10, requires={"device": "gpu"})
    assert fit_check(f) > 0


async def test_best_fit_walks_where_the_tree_budget_is_spent(fleets: Callable[..., Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Trees are capped in leaves (a thousand distinct ``requires`` must not cost a thousand fleet-sized trees):
    past the cap a job's count is the walk's, and picks go on."""
    monkeypatch.setattr(fit_index, "LEAVES_PER_AGENT", 0)
    monkeypatch.setattr(fit_index, "LEAVES_SPARE", 4)
    f: Fleet = await fleets("best-fit")
    agents = [await f.agent(f"gpu{i}", mid_gpu(i)) for i in range(6)]
    await f.submit(3)
    await f.submit(3, requires={"device": "gpu"})
    policy = f.board.policy
    assert isinstance(policy, BestFit)
    taken = [len(await f.lease(a, 1)) for a in agents]
    assert sum(taken) > 0
    assert sum(t.leaves for t in policy.index._trees.values()) <= 4
    walked: list[str] = []
    assert fit_check(f, walked) > 0 and walked                      # the walk's counts, where no tree fits


async def test_best_fit_forgets_pauses_when_the_clock_goes_back(fleets: Callable[..., Any]) -> None:
    """A wall clock stepped back (NTP) would make a pause judged over a pause again: the index starts over."""
    f: Fleet = await fleets("best-fit")
    for i in range(5):
        await f.agent(f"gpu{i}", mid_gpu(i))
    await f.submit(20)
    assert fit_check(f) > 0
    state = next(iter(f.board.agents.values()))
    state.quiet_until = f.clock.now + 5
    f.board._dispatcher.context.note(state)                         # as ``Dispatcher.retry_after`` does
    f.clock.now += 10
    assert fit_check(f) > 0
    f.clock.now -= 8                                                 # back inside the pause
    assert fit_check(f) > 0
