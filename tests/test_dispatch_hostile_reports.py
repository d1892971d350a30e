"""Hostile capability reports and fleet churn against the dispatch indexes: a pick never raises.

A volunteer's report is its word: numbers at the edge of what a float holds (a speed of 1e-320 GFLOPS that
makes every runtime infinite, a memory of 1.7e308 GB) are accepted at registration. The policies' kept
indexes (best-fit's trees, fastest's covers, the wake index's capability classes) must answer such agents,
and everyone else, without an exception escaping the pick (a 500 to the agent, and for a rival a broken
pick for the whole fleet).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, GTX1060, cpu_caps
from test_dispatch_indexes import Fleet, fit_check

from hub.dispatch import predict
from jobs.protocol_registration import Registration
from jobs.protocol_upkeep import HeartbeatLease
from security.errors import BadRequest
from security.identity import Identity

fleets = test_dispatch_indexes.fleets   # the fixture: a real board per policy

SLOW = {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 1e-320}}   # every runtime: infinite


@pytest.mark.parametrize("policy", ["fastest", "adaptive", "best-fit"])
async def test_an_agent_claiming_a_near_zero_speed_is_answered_not_crashed(fleets: Callable[..., Any],
                                                                           policy: str) -> None:
    """1e-320 GFLOPS: its predicted runtime overflows to infinity; the earliest-finish count of rivals ahead of
    it (a ceil of infinity) raised OverflowError out of the pick. It gets nothing while a rival can run the
    work, and the rivals' own picks go on."""
    f: Fleet = await fleets(policy)
    gtx = await f.agent("gtx", GTX1060)
    slow = await f.agent("slow", SLOW)
    await f.submit(3)
    assert await f.lease(slow) == [] or policy == "best-fit"
    assert len(await f.lease(gtx, 3)) >= 1
    await f.submit(3)
    await f.lease(slow)   # again, with a kept cover of the GTX
    assert len(await f.lease(gtx, 3)) >= 1


async def test_a_report_with_a_memory_near_the_float_limit_gets_a_capability_class(fleets: Callable[..., Any]) -> None:
    """Rounding 1.7e308 GB up to its bucket overflowed (1.25 ** 3182): the agent's every lease request raised
    while the board classed it for the wake index."""
    f: Fleet = await fleets("priority-fifo")
    huge = await f.agent("huge", cpu_caps(memory_gb=1.7e308))
    assert await f.lease(huge) == []
    await f.submit(2)
    assert f.board.retry_after(huge.id) is None               # work its class may run: ask again at once
    assert len(await f.lease(huge, 2)) == 2


async def test_best_fit_forgets_the_trees_of_finished_jobs(fleets: Callable[..., Any]) -> None:
    """A submitter's many one-task jobs, each with its own ``requires``: a tree each while they wait. Once they
    are done their trees must go (every pick's sync walked every kept tree for each changed agent, forever,
    and the leaf budget never dropped them while the fleet was large enough)."""
    f: Fleet = await fleets("best-fit")
    a100 = await f.agent("a100", A100)
    gtx = await f.agent("gtx", GTX1060)
    laptop = await f.agent("laptop", cpu_caps(slots=4))
    jobs = 120
    for i in range(jobs):
        await f.submit(1, requires={"min_memory_gb": 1 + i / 1000})
    policy = f.board.policy
    done = 0
    while done < jobs:
        got = 0
        for ident in (laptop, gtx, a100):
            for task in await f.lease(ident, 4):
                f.clock.now += 0.01
                await f.finish(ident, task, wall_s=1.0)
                got += 1
        done += got
        assert got, "no agent took the remaining work"
    await f.submit(2, requires={"min_memory_gb": 2.5})   # the next job's pick: the finished ones' trees go
    assert len(await f.lease(a100, 2)) + len(await f.lease(gtx, 2)) + len(await f.lease(laptop, 2)) == 2
    assert len(policy.index._trees) <= 2 * len(f.board._dispatcher.context.queues) + 64


async def test_best_fit_keeps_its_tree_while_strangers_who_cannot_run_the_job_register(
        fleets: Callable[..., Any]) -> None:
    """Open registration: a stranger registers hundreds of CPU-only keys. None can run a GPU job, yet each one
    counted towards its tree's "judged one by one" limit, so every 64 registrations rebuilt every tree (a scan of
    the connected fleet each). The tree stays; its counts stay the walk's."""
    f: Fleet = await fleets("best-fit")
    gpus = [await f.agent(f"gpu{i}", GTX1060) for i in range(3)]
    a100 = await f.agent("a100", A100)
    job = await f.submit(40, requires={"device": "gpu"})
    assert len(await f.lease(gpus[0])) == 1
    policy = f.board.policy
    tree = policy.index._by_job[job]
    for i in range(200):
        await f.agent(f"stranger{i}", cpu_caps(memory_gb=1 + i))
    assert len(await f.lease(gpus[1])) == 1
    assert len(await f.lease(a100)) == 1                              # one idle GTX cannot absorb 38
    assert policy.index._by_job[job] is tree and tree.live
    assert fit_check(f) > 0


@pytest.mark.parametrize("policy", ["fastest", "best-fit"])
async def test_cancelled_jobs_leave_nothing_in_the_predictors_leases(fleets: Callable[..., Any], policy: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A submitter who cancels jobs while their tasks are out on lease: the predictor noted each leased task
    (for when its agent is free) and heard of none of them again, so every cancelled lease stayed for good. Its
    looks (here without the usual floor of entries) keep them to twice those still out."""
    monkeypatch.setattr(predict, "LEASED_CHECK", 0)
    f: Fleet = await fleets(policy)
    gtx = await f.agent("gtx", GTX1060)
    predictor = f.board.policy.predictor
    for _ in range(30):
        job = await f.submit(4)
        assert len(await f.lease(gtx, 4)) == 4
        await f.board.cancel(job, f.user.id)
    await f.submit(2)
    out = await f.lease(gtx, 4)                                        # its slots are free again
    assert len(out) == 2
    assert {task.task_id for task in out} <= set(predictor.leased)
    assert len(predictor.leased) <= 2 * 4                              # not 122


ODD_REPORTS: list[dict[str, Any]] = [
    GTX1060, A100, cpu_caps(), cpu_caps(slots=10**6), cpu_caps(slots=-5), SLOW,
    cpu_caps(memory_gb=float("nan")), cpu_caps(memory_gb=-1.0), cpu_caps(memory_gb=1.7e308),
    {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": float("inf")}},
    {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": -3.0, "memory_bandwidth_gbps": 1e-320}},
    {**GTX1060, "gpus": [{**GTX1060["gpus"][0], "gflops_fp32": 1e-320, "gflops_fp16": float("nan")}]},
    {**A100, "gpus": [{**A100["gpus"][0], "vram_gb": float("inf"), "gflops_fp32": 1e300}]},
    cpu_caps(available_until=float("nan")), cpu_caps(available_until=-1.0),
]


@pytest.mark.parametrize("seed", [3, 7, 8, 11])
@pytest.mark.parametrize("policy", ["best-fit", "fastest", "adaptive"])
async def test_a_fleet_of_lying_volunteers_churning_never_breaks_a_pick(fleets: Callable[..., Any],
                                                                        policy: str, seed: int) -> None:
    """Volunteers re-register every few seconds with odd reports (NaN, infinities, negatives, 10^6 slots, a
    window already over), are told to pause, finish work or go silent, while a submitter adds and cancels
    jobs: every pick answers, and the kept answers (best-fit's counts, fastest's and adaptive's shares, who is
    connected and idle) stay those of a scan from scratch."""
    rng = random.Random(seed)
    f: Fleet = await fleets(policy)
    agents = [await f.agent(f"v{i}", ODD_REPORTS[i % len(ODD_REPORTS)]) for i in range(len(ODD_REPORTS))]
    jobs = [await f.submit(6), await f.submit(4, requires={"device": "gpu"})]
    held: list[tuple[Any, Any]] = []
    compared = 0
    for step in range(150):
        ident = rng.choice(agents)
        event = rng.randrange(6)
        if event == 0:
            await f.agent(f"v{step}", rng.choice(ODD_REPORTS), identity=ident)
        elif event == 1:
            held += [(ident, task) for task in await f.lease(ident, rng.choice((1, 4)))]
            f.board.retry_after(ident.id)
        elif event == 2 and held:
            who, task = held.pop(rng.randrange(len(held)))
            f.clock.now += 1
            await f.finish(who, task, wall_s=rng.choice((0.01, 5.0, 900.0)))
        elif event == 3:
            jobs.append(await f.submit(rng.randint(1, 5), policy={"deadline": f"{rng.randint(1, 60)}m"}))
        elif event == 4 and len(jobs) > 2:
            job = jobs.pop(rng.randrange(2, len(jobs)))
            await f.board.cancel(job, f.user.id)
            held = [(who, task) for who, task in held if task.job_id != job]
        else:
            f.clock.now += rng.choice((0.5, 30.0, 400.0))
        if step % 5 == 4:   # the kept answers equal a scan from scratch
            compared += fit_check(f) if policy == "best-fit" else f.check()
    assert compared > 0


@pytest.mark.parametrize("policy", ["fastest", "best-fit"])
async def test_a_window_end_of_nan_means_no_window_everywhere(fleets: Callable[..., Any], policy: str) -> None:
    """``available_until: NaN`` (JSON allows it): presence read it as "past its window" for a new agent (never
    connected) but kept an agent that re-registered with it as a member, while the predictor and best-fit's
    trees read it as no window. It is no window everywhere now: connected, idle and counted alike."""
    f: Fleet = await fleets(policy)
    gtx = await f.agent("gtx", GTX1060)
    odd = await f.agent("odd", cpu_caps())
    fresh = await f.agent("fresh", cpu_caps(available_until=float("nan")))
    await f.submit(6)
    assert len(await f.lease(gtx)) == 1
    await f.agent("odd", cpu_caps(available_until=float("nan")), identity=odd)   # re-registers with it
    context = f.board._dispatcher.context
    assert {a.row.id for a in context.connected()} == f.connected() >= {odd.id, fresh.id}
    if policy == "best-fit":
        assert fit_check(f) > 0
    else:
        assert f.check() > 0


@pytest.mark.parametrize("report", [{"cpu": {"cores": float("inf")}}, {"gpus": [{"index": float("-inf")}]}])
def test_a_registration_with_an_infinite_count_is_a_bad_request(report: dict[str, Any]) -> None:
    """``cores: Infinity`` made ``int()`` raise OverflowError out of the registration's decoding: a stranger's
    500, where NaN was already a clear 400."""
    with pytest.raises(BadRequest) as caught:
        Registration.decode({"public_key": Identity.generate().public.text(), "name": "x", "capabilities": report})
    assert caught.value.code == "bad_capabilities"


#: reports a liar switches between while it holds leases: fewer slots than it holds, speeds at a float's edges
SLOT_LIES: list[dict[str, Any]] = [
    cpu_caps(slots=1), cpu_caps(slots=2), cpu_caps(slots=4), {**A100, "slots": 1}, {**A100, "slots": 3},
    {**GTX1060, "slots": 2}, {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 1e308}, "slots": 2},
    {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 1e-320}, "slots": 2}, SLOW,
    {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": float("nan")}, "slots": 2},
]


def pace(f: Fleet, pause_s: float) -> None:
    """Idle agents of this small fleet are told to pause ``pause_s`` s or more (a small fleet gets none)."""
    pacing = f.board._dispatcher.pacing
    pacing.config = replace(pacing.config, min_poll_interval_s=pause_s)


class LeaseChurn:
    """The fleet events the lease-holding churn tests draw (here and in test_dispatch_repair_counts.py): each
    makes its random draws in one fixed order, so a seed names the same sequence wherever it runs."""

    def __init__(self, f: Fleet, rng: random.Random) -> None:
        self.f, self.rng = f, rng
        self.held: list[tuple[Identity, Any]] = []   # (agent, assignment) leases out

    async def lease(self, ident: Identity, sizes: tuple[int, ...], pause: bool = False) -> None:
        self.held += [(ident, task) for task in await self.f.lease(ident, self.rng.choice(sizes))]
        if pause:
            self.f.board.retry_after(ident.id)   # told after its ask: a pause if nothing is queued for its class

    async def finish(self, factors: tuple[float, ...], odd_walls: tuple[float, ...]) -> None:
        """A held task ends, its wall time its prediction x one of ``factors``, or one of ``odd_walls``."""
        f, rng = self.f, self.rng
        who, task = self.held.pop(rng.randrange(len(self.held)))
        f.clock.now += rng.choice((0.0, 0.3, 1.0))
        predictor = f.board.policy.predictor
        assert predictor is not None
        base = predictor.leased.get(task.task_id)
        wall = (base[1] if base else 1.0) * rng.choice(factors)
        await f.finish(who, task, wall_s=rng.choice((wall, wall, *odd_walls)))

    async def cancel(self, jobs: list[str]) -> None:
        job = jobs.pop(self.rng.randrange(len(jobs)))
        await self.f.board.cancel(job, self.f.user.id)
        self.held = [(who, task) for who, task in self.held if task.job_id != job]

    async def heartbeat(self) -> None:
        who, task = self.rng.choice(self.held)
        await self.f.board.heartbeat(who.id, [HeartbeatLease(task.task_id, task.lease_id)])

    async def expire(self) -> None:
        """Past the lease time: the sweep takes back what was not heard of."""
        f = self.f
        f.clock.now += self.rng.choice((650.0, 1300.0))
        await f.board.sweep()
        self.held = [(who, t) for who, t in self.held if (row := f.board._queues.task(t.task_id)) is not None
                     and row.lease_id == t.lease_id]

    async def release(self) -> None:
        who, task = self.held.pop(self.rng.randrange(len(self.held)))
        await self.f.board.release(who.id, task.task_id, task.lease_id)

    async def event(self, event: int, ident: Identity, jobs: list[str], factors: tuple[float, ...],
                    odd_walls: tuple[float, ...]) -> bool:
        """The events both churn tests number alike (1-3 and 5-9); False where ``event`` is none of them or
        cannot happen now (nothing held, one job left): the caller's later branches take it."""
        if event in (1, 2):
            await self.lease(ident, (1, 2, 4))
        elif event == 3 and self.held:
            await self.finish(factors, odd_walls)
        elif event == 5 and len(jobs) > 1:
            await self.cancel(jobs)
        elif event == 6:
            await self.lease(ident, (1, 2), pause=True)
        elif event == 7 and self.held:
            await self.heartbeat()
        elif event == 8:
            await self.expire()
        elif event == 9 and self.held:
            await self.release()
        else:
            return False
        return True


#: how far the host's clock is set back, when it is: a few seconds (drift), or an hour (a clock that ran fast)
BACK_STEPS: dict[str, tuple[float, ...]] = {"none": (), "seconds": (0.3, 3.0, 30.0),
                                            "hours": (0.3, 3.0, 30.0, 700.0, 3600.0)}


@pytest.mark.parametrize("back", list(BACK_STEPS))
#: seeds 37, 43, 50-52 with the clock set back once left a dropped agent out of presence (hub/presence.py); 24 with
#: steps of hours kept a rival's stay in fastest's covers from before its seen time was moved into the new time
@pytest.mark.parametrize("seed", [*range(12), 24, 37, 43, 50, 51, 52])
@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_lying_volunteers_that_hold_leases_through_every_fleet_event_keep_the_scans_answers(
        fleets: Callable[..., Any], policy: str, seed: int, back: str) -> None:
    """The kept covers (sorted marks aged as rivals' free times pass, runtimes per task shape, the floor of the
    learned corrections) against a scan from scratch, after every event a lying volunteer or the board can
    bring: re-registrations that change slots and speeds while leases are held, wall times that make
    corrections swing around FLOOR, pauses told outside a pick, cancels of jobs whose tasks are out, lease
    expiries, heartbeats, releases, long and short waits and (``back``) a clock set back by seconds or hours."""
    rng = random.Random(seed)
    f: Fleet = await fleets(policy)
    pace(f, 20.0)
    agents = [await f.agent(f"v{i}", SLOT_LIES[i % len(SLOT_LIES)]) for i in range(8)]
    jobs = [await f.submit(30), await f.submit(12, requires={"device": "gpu"})]
    churn = LeaseChurn(f, rng)
    compared = 0
    for step in range(120):
        ident = rng.choice(agents)
        event = rng.randrange(12)
        if event == 0:
            await f.agent(f"v{step}", rng.choice(SLOT_LIES), identity=ident)
        elif event == 4:
            jobs.append(await f.submit(rng.randint(1, 8), policy={"deadline": f"{rng.randint(1, 60)}m"}))
        elif await churn.event(event, ident, jobs, (0.49, 0.5, 0.51, 1.0, 1e-6, 1e6),
                               (1e-320, 0.01, float("nan"), float("inf"))):
            pass
        elif event == 10 and BACK_STEPS[back]:
            f.clock.now -= rng.choice(BACK_STEPS[back])   # the host's clock is set back
        else:
            f.clock.now += rng.choice((0.2, 0.7, 5.0, 40.0))
        compared += f.check(untouched=True)
    assert compared > 0


@pytest.mark.parametrize("slower", [7, 11, 15, 19])
@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_a_cancel_that_leaves_an_overfull_rival_busy_longer_is_heard_by_the_covers(
        fleets: Callable[..., Any], policy: str, slower: int) -> None:
    """A volunteer holds two leases, then registers again with one slot: it stays full, free when the sooner of
    its two tasks ends. A cancel of that task's job takes it away without a pick or a settled attempt of the
    volunteer's, and it is now free only when the later one ends: a cover (and its marks, aged as that sooner
    end passed) that still counted it free early said rivals finish more than they do, and a slower asker was
    told to take none of work the scan gives it."""
    f: Fleet = await fleets(policy)
    liar = await f.agent("liar", {**A100, "slots": 2})
    laptop = await f.agent("laptop", cpu_caps())
    predictor = f.board.policy.predictor
    await f.submit(1)
    [warm] = await f.lease(liar)
    f.clock.now += 1
    await f.finish(liar, warm, wall_s=predictor.leased[warm.task_id][1] * slower)   # ~5-13 s a task
    soon = await f.submit(1)
    [first] = await f.lease(liar)
    runtime = predictor.leased[first.task_id][3] - f.clock.now
    f.clock.now += 0.9 * runtime
    await f.submit(1)
    assert len(await f.lease(liar)) == 1                     # its second slot, busy a full runtime longer
    await f.agent("liar", {**A100, "slots": 1}, identity=liar)   # full now, until the sooner task ends
    for n in range(1, 16):
        await f.submit(n)
    await f.lease(laptop, 1)                                 # the laptop asks: its walks' covers are kept
    assert f.check(untouched=True) > 0
    await f.board.cancel(soon, f.user.id)
    assert f.check(untouched=True) > 0
    f.clock.now += 0.2 * runtime                             # past the sooner end: its marks age
    assert f.check(untouched=True) > 0


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_a_wall_time_of_nan_teaches_the_predictor_nothing(fleets: Callable[..., Any], policy: str) -> None:
    """``wall_s: NaN`` (JSON allows it in a signed result) passed the ``<= 0`` guard and became a NaN
    correction: the agent's every predicted runtime NaN, and a NaN in ``floor()``'s heap, which orders
    nothing, so a lower correction pushed below it stayed buried and the walk's bound over the unvisited
    agents could be looser than their quickest real correction. A non-finite wall time is ignored."""
    f: Fleet = await fleets(policy)
    names = ["steady", "liar", "quicker", "quickest"]
    agents = {name: await f.agent(name, cpu_caps()) for name in names}
    predictor = f.board.policy.predictor
    await f.submit(8)
    for name, ratio in zip(names, (1.0, float("nan"), 0.9, 0.7), strict=True):
        [task] = await f.lease(agents[name])
        f.clock.now += 1
        await f.finish(agents[name], task, wall_s=predictor.leased[task.task_id][1] * ratio)
    assert all(math.isfinite(v) for v in [*predictor.log_ratio.values(), *predictor.agent_log_ratio.values()])
    assert predictor.factor(agents["liar"].id, "matmul") == 1.0       # as measured: nothing learned
    assert predictor.floor() == pytest.approx(0.7)


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_a_cancel_that_leaves_an_early_asker_paused_is_heard_by_the_covers(
        fleets: Callable[..., Any], policy: str) -> None:
    """A volunteer told to pause asks again at once all the same and takes a task: its free time is that
    task's end. Its job is cancelled: it is idle but paused, free only when its pause ends, later than a cover
    counted it; the cancel is neither a pick nor a settled attempt of its own."""
    f: Fleet = await fleets(policy)
    pace(f, 60.0)
    liar = await f.agent("liar", GTX1060)
    laptop = await f.agent("laptop", cpu_caps())
    assert await f.lease(liar) == [] and f.board.retry_after(liar.id) is not None   # nothing for it: paused
    soon = await f.submit(1)
    assert len(await f.lease(liar)) == 1                      # it asks early, and is given the task
    await f.submit(10)
    assert await f.lease(laptop, 1) == []                    # the GTX finishes ~20 first: a cover is kept
    assert f.check(untouched=True) > 0
    await f.board.cancel(soon, f.user.id)
    assert f.check(untouched=True) > 0
