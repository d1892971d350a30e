"""Hostile review of the tally (hub/dispatch/tally.py): events it must hear, bounds it must keep.

Each test drives a real board (``Fleet`` of test_dispatch_indexes.py) into a case the tally could get wrong and
compares every gate, the tally's included, with the scan from scratch (``Fleet.check``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, GTX1060, WORK, cpu_caps, gpu_caps
from test_dispatch_indexes import Fleet

from hub.dispatch import members, tally

fleets = test_dispatch_indexes.fleets   # the fixture: a real board per policy


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_an_asker_whose_pick_asks_nothing_is_still_judged_again(fleets: Callable[..., Any],
                                                                     policy: str) -> None:
    """The asker is judged again at its pick's first question (its own ask ends a gate's refusal, which no log
    says). A pick with nothing to ask (no queued job it can run) asks none: the next pick must still judge it,
    or a rival whose refusal ended stays out of the sorted runtimes and a laptop takes work the A100 covers."""
    f: Fleet = await fleets(policy)
    laptop, a100 = await f.agent("laptop", cpu_caps()), await f.agent("a100", A100)
    first = await f.submit(50)
    assert await f.lease(laptop) == []             # the A100 covers the queue (a list is built)
    f.gate.ids.add(a100.id)
    assert await f.lease(a100) == []               # refused (noted): out of the list at the next question
    assert len(await f.lease(laptop)) == 1         # no rival: the laptop takes one
    await f.board.cancel(first, f.user.id)
    f.gate.ids.discard(a100.id)
    assert await f.lease(a100) == []               # no longer refused; nothing queued: its pick asks nothing
    await f.submit(50)
    assert f.check() > 0
    assert await f.lease(laptop) == []             # the A100 covers the new queue


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_an_asker_already_counted_full_that_takes_a_quicker_task_is_judged_again(fleets: Callable[..., Any],
                                                                                      policy: str) -> None:
    """An agent that reports no slots counts as one slot (``slots_of``) but may hold up to the board's cap. Busy
    with a long task, it asks again and takes a short one: it is free far sooner, with no free-slot change to
    log (it was full before and after). Judged only at the start of its own pick, the tally kept its old free
    time and told a laptop to take what the A100 finishes first."""
    f: Fleet = await fleets(policy)
    a100, laptop = await f.agent("a100", A100), await f.agent("laptop", cpu_caps())
    await f.submit(1, params={"size": 8192, "iterations": 2000})   # ~113 s on the A100
    assert len(await f.lease(a100)) == 1
    await f.submit(50)                            # ~0.7 s on the A100, ~69 s on the laptop
    assert len(await f.lease(laptop)) == 1        # the A100, busy longer than a laptop task, finishes none first
    assert len(await f.lease(a100)) == 1          # full by its count, it holds two: free in 0.7 s, not 113 s
    assert f.check(untouched=True) > 0            # (each asker of a copy: asked in turn, the A100 was judged again)
    assert await f.lease(laptop, 1) == []         # the A100 now finishes ~97 of the 48 left first


#: what the churn below registers: reports without slots (counted as one, leased up to the board's cap) among them
REPORTS = [cpu_caps(), cpu_caps(slots=2), A100, {**A100, "slots": 2}, GTX1060, {**GTX1060, "slots": 3},
           gpu_caps("mid", 12, 9000), {**cpu_caps(), "cpu": {"cores": 8, "gflops_fp32": 400.0}},
           gpu_caps("h", 80, 60000, slots=4)]


#: seed 11 (fastest) found an asker holding more tasks than its counted slot judged before its quicker take; 226
#: (adaptive) an agent avoided for one kind kept in a cover as a late part through its free time noted for another
@pytest.mark.parametrize("seed", [11, 226, 1])
@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_flaky_volunteers_of_mixed_kinds_keep_the_scans_answers(
        fleets: Callable[..., Any], policy: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random fleet events against the scan after each: leases of 1-4 tasks by agents reporting no slots (counted
    as one, holding up to the cap), failed attempts (``adaptive``'s error rates), matmul at fp32 and fp16 and sleep
    jobs with deadlines and requirements, refusals that start and end, re-registrations with windows, expiries,
    releases, cancels, clock steps back; the tally's limits drawn small so its fallbacks run too."""
    rng = random.Random(seed)
    monkeypatch.setattr(tally, "LOOK", rng.choice((1, 2, 64)))
    monkeypatch.setattr(tally, "LISTS_MAX", rng.choice((1, 2, 16)))
    monkeypatch.setattr(members, "FEW", rng.choice((0, 1, 16)))
    monkeypatch.setattr(members, "ROUNDS", rng.choice((1, 3, 256)))
    f: Fleet = await fleets(policy)
    if rng.random() < 0.5:
        pacing = f.board._dispatcher.pacing
        pacing.config = replace(pacing.config, min_poll_interval_s=rng.choice((5.0, 20.0)))
    agents: list[Any] = []
    for i in range(rng.randint(3, 10)):
        caps = dict(rng.choice(REPORTS))
        if rng.random() < 0.2:
            caps["available_until"] = f.clock.now + rng.choice((10, 100, 1000))
        agents.append(await f.agent(f"v{i}", caps))
    jobs: list[str] = []

    async def submit() -> None:
        r = rng.random()
        spec: dict[str, Any] = {}
        if rng.random() < 0.3:
            spec["policy"] = {"deadline": rng.choice(("1m", "5m", "20m", "2h"))}
        if rng.random() < 0.3:
            spec["requires"] = rng.choice(({"device": "gpu"}, {"min_memory_gb": 20}, {"device": "cpu"}))
        n = rng.choice((1, 3, 10, 60, 400))
        if r < 0.5:
            jobs.append(await f.submit(n, **spec))
        elif r < 0.7:
            jobs.append(await f.submit(n, params={**WORK, "dtype": "float16"}, **spec))
        elif r < 0.85:
            jobs.append(await f.submit(n, params={**WORK, "size": rng.choice((256, 1024, 8192))}, **spec))
        else:
            jobs.append(await f.submit(n, task="sleep", params={}, sweep={"seconds": [rng.choice((1, 10, 100))] * n},
                                       **spec))

    for _ in range(rng.randint(1, 3)):
        await submit()
    held: list[tuple[Any, Any]] = []
    for step in range(100):
        ident = rng.choice(agents)
        e = rng.randrange(16)
        if e in (0, 1, 2, 3):
            for t in await f.lease(ident, rng.choice((1, 2, 4))):
                held.append((ident, t))
            if rng.random() < 0.3:
                f.board.retry_after(ident.id)
        elif e in (4, 5) and held:
            who, t = held.pop(rng.randrange(len(held)))
            f.clock.now += rng.choice((0.0, 0.5, 3.0))
            if rng.random() < 0.3:
                await f.fail(who, t, error_class="oom", wall_s=None)
            else:
                predictor = f.board.policy.predictor
                assert predictor is not None
                base = predictor.leased.get(t.task_id)
                wall = (base[1] if base else 1.0) * rng.choice((0.3, 0.5, 1.0, 2.0, 10.0))
                await f.finish(who, t, wall_s=wall)
        elif e == 6:
            await submit()
        elif e == 7 and len(jobs) > 1:
            j = jobs.pop(rng.randrange(len(jobs)))
            await f.board.cancel(j, f.user.id)
            held = [(w, t) for w, t in held if t.job_id != j]
        elif e == 8:
            if ident.id in f.gate.ids:
                f.gate.ids.discard(ident.id)
            else:
                f.gate.ids.add(ident.id)
        elif e == 9:
            caps = dict(rng.choice(REPORTS))
            if rng.random() < 0.2:
                caps["available_until"] = f.clock.now + rng.choice((10, 100, 1000))
            await f.agent("re", caps, identity=ident)
        elif e == 10:
            f.clock.now += rng.choice((650.0, 1300.0))
            await f.board.sweep()
            held = [(w, t) for w, t in held if (row := f.board._queues.task(t.task_id)) is not None
                    and row.lease_id == t.lease_id]
        elif e == 11 and held:
            who, t = held.pop(rng.randrange(len(held)))
            await f.board.release(who.id, t.task_id, t.lease_id)
        elif e == 12 and rng.random() < 0.3:
            f.clock.now -= rng.choice((0.5, 5.0, 100.0))
        elif e == 13:
            agents.append(await f.agent(f"n{step}", rng.choice(REPORTS)))
        else:
            f.clock.now += rng.choice((0.1, 0.7, 3.0, 40.0))
        f.check(untouched=rng.random() < 0.7)
