"""The indexes behind quicker ``fastest``/``adaptive`` picks give the answers of a computation from scratch.

``roster.KindOrder`` keeps the connected agents by predicted speed for a kind (learned correction / top speed) as
reports, presence and corrections change; ``Roster.most_after`` bounds the agents after a position by bisection;
a cover counts a busy rival at its real free time and to the microsecond (epoch-time rounding is far smaller);
the log of agents a repair looks at again is bounded. Each is compared with the plain computation, on a real board
where it follows fleet events.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import test_dispatch_indexes
from test_dispatch import A100, GTX1060, cpu_caps, gpu_caps
from test_dispatch_indexes import Fleet

from hub.dispatch.covers import ASKED_MAX, MARKS, Cover, Covers, ceil_count, finishes
from hub.dispatch.fastest import Fastest
from hub.dispatch.roster import BOUND_ROUNDS, top_speed
from hub.fleet import derived

fleets = test_dispatch_indexes.fleets   # the fixture: a real board per policy


def _order_from_scratch(f: Fleet, kind: str) -> list[tuple[float, str]]:
    policy = f.board.policy
    assert isinstance(policy, Fastest)
    return sorted((policy.predictor.factor(a.row.id, kind) / derived(a, "top_speed", top_speed), a.row.id)
                  for a in f.board.agents.values() if a.row.id in f.connected())


def _kept_order(f: Fleet, kind: str) -> list[tuple[float, str]]:
    policy = f.board.policy
    assert isinstance(policy, Fastest)
    context = f.board._dispatcher.context
    policy.roster.update(context)
    return list(policy.roster.for_kind(context, kind, policy.predictor)._order)


async def test_the_kind_order_follows_reports_presence_and_learned_speeds(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    a100 = await f.agent("a100", A100)
    gtx = [await f.agent(f"gtx{i}", GTX1060) for i in range(4)]
    laptop = await f.agent("laptop", cpu_caps())
    await f.submit(80)
    assert _kept_order(f, "matmul") == _order_from_scratch(f, "matmul")
    held = [(ident, task) for ident in (a100, *gtx, laptop) for task in await f.lease(ident, 2)]
    assert f.check() > 0
    # results teach corrections: the A100 runs 50x slower than measured, a GTX 3x quicker, the laptop quick
    for ident, task in held:
        f.clock.now += 1
        await f.finish(ident, task, wall_s={a100.id: 500.0, gtx[0].id: 0.3, laptop.id: 0.05}.get(ident.id, 2.0))
        assert _kept_order(f, "matmul") == _order_from_scratch(f, "matmul")
        assert f.check() > 0
    # a GTX registers again with an A100 report, another as a laptop; a new agent joins; time passes
    await f.agent("gtx1", gpu_caps("A100", 40, 19_500), identity=gtx[1])
    await f.agent("gtx2", cpu_caps(), identity=gtx[2])
    await f.agent("late", GTX1060)
    assert _kept_order(f, "matmul") == _order_from_scratch(f, "matmul")
    assert f.check() > 0
    f.clock.now += 700                                  # the silent ones drop out; two ask again
    for ident in (a100, gtx[3]):
        await f.lease(ident)
    assert _kept_order(f, "matmul") == _order_from_scratch(f, "matmul")
    assert f.check() > 0


async def test_most_after_is_the_sum_agent_by_agent(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    rng = random.Random(3)
    for i in range(60):
        await f.agent(f"g{i}", gpu_caps("GTX", 8, rng.choice([4_400, 6_500, 12_700, 35_600, 82_600])
                                        * rng.uniform(0.9, 1.1)))
    await f.submit(5)
    policy = f.board.policy
    assert isinstance(policy, Fastest)
    context = f.board._dispatcher.context
    policy.roster.update(context)
    order = policy.roster.for_kind(context, "matmul", policy.predictor)
    keys = [key for _, key, _ in order.fastest_first()]
    for _ in range(300):
        horizon = rng.uniform(0.01, 40) * keys[len(keys) // 2]

        def most(key: float, horizon: float = horizon) -> int | None:
            return ceil_count(horizon / key - 1e-9) - 1
        start, limit = rng.randrange(len(keys) + 1), rng.randrange(0, 400)
        exact = sum(max(most(key) or 0, 0) for key in keys[start:])
        counts = [most(key) or 0 for key in keys[start:]]
        got = order.most_after(start, most, limit)
        if exact <= limit and max(counts, default=0) <= BOUND_ROUNDS:
            assert got == exact
        else:
            assert got is None or got == exact


def test_a_busy_rival_counts_the_time_that_passed_since_the_count() -> None:
    """A rival busy for 2 s when its part was counted is, 1.5 s later, free in 0.5 s: at a 0.515 s horizon it
    finishes one 10 ms task first (the part counted at its old offset said none, and the walk ran again)."""
    cover = Cover("g", 1_700_000_000.0)
    cover.add("busy", 2.0, 0.01, math.inf)
    now = cover.at + 1.5
    assert finishes(0.515, 0.5, 0.01) == 1
    assert cover.reach(0.515, now) == 1
    assert cover.reach(0.525, now) == 2
    assert cover.reach(0.505, now) == 0


def test_short_tasks_are_counted_to_the_microsecond_and_never_beyond_the_walk() -> None:
    """A rival running a 29.5 ms task finishes one before an asker needing 30 ms: the walk counts it, and so must
    a cover (with a millisecond in hand it counted none, and the asker walked again). What the cover subtracts
    still exceeds the rounding of epoch-second times: over random epochs and spans the cover's count never
    exceeds the walk's, computed from the same floats the board uses."""
    assert finishes(0.030, 0.0, 0.0295) == 1
    rng = random.Random(11)
    for _ in range(100_000):
        at = rng.uniform(1.6e9, 4.1e9)
        now = at + rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 1e5)])
        mine = rng.choice([rng.uniform(1e-4, 0.1), rng.uniform(0.1, 1e4)])
        free = max(at + rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 1e5)]), now - rng.uniform(0, 1))
        runtime = mine * rng.uniform(0.2, 1.2)
        my_end = now + mine
        walk = ceil_count((my_end - max(free, now)) / runtime - 1e-9) - 1
        offset = free - at
        counted = finishes(my_end - now, max(offset - (now - at), 0.0), runtime)
        assert counted <= walk
        cover = Cover("g", at)
        cover.add("r", offset, runtime, math.inf)
        assert cover.reach(my_end - now, now) <= max(min(walk, MARKS), 0)


def test_the_log_of_agents_to_count_again_is_bounded() -> None:
    covers = Covers()
    for i in range(3 * ASKED_MAX):
        covers.forget(f"a{i}")
    assert len(covers._asked) <= ASKED_MAX
    assert covers.asked_version() == 3 * ASKED_MAX
    assert covers.asked_since(0, 256) == [f"a{i}" for i in range(3 * ASKED_MAX - 256, 3 * ASKED_MAX)]
    assert covers.asked_since(covers.asked_version() - 2, 256) == [f"a{3 * ASKED_MAX - 2}", f"a{3 * ASKED_MAX - 1}"]
