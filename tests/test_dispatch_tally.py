"""The tally's arithmetic (hub/dispatch/tally.py, members.py) against the walk's, case by random case.

``fastest`` counts an idle rival's part as ``ceil_count((my_end - now) / runtime - 1e-9) - 1`` (``SoonestGate._ahead``,
cut to none where ``now + runtime`` passes the deadline); the tally bounds that from sorted keys with ``entry`` per key
and ``sums`` over a sorted list. These tests check the three links the tally's exactness rests on: ``sums`` is the
sum of ``entry`` over the keys (the tally takes keys out of a sum by subtracting their entries), ``entry`` is the
largest ``k`` of its float rule, and ``bounds`` brackets the walk's count computed with the predictor's own
arithmetic, for epochs, horizons and keys drawn near the boundaries where rounding decides. The last test shows the
bracket needs its slack: without it, some of the same cases fall outside.
"""

from __future__ import annotations

import bisect
import math
import random

import pytest

from hub.dispatch import tally
from hub.dispatch.covers import ceil_count
from hub.dispatch.members import ROUNDS, entry, sums
from hub.dispatch.predict import base_seconds
from hub.dispatch.tally import bounds
from jobs.kinds.base import Cost
from jobs.requirements import Capabilities, Requirements

NOWS = (0.0, 1.0, 1_000_000.0, 1_765_000_000.123, 4.1e9, 3.3e12)


def brute(key: float, a: float, cut: float, most: int = 100_000) -> int:
    """How many ``k >= 1`` satisfy ``key < min(a / (k + 1e-9), cut)``, counted one by one (up to ``most``)."""
    k = 0
    while k < most and key < min(a / (k + 1 + 1e-9), cut):
        k += 1
    return k


def random_keys(rng: random.Random, n: int) -> list[float]:
    """Keys as a fleet has them: a few distinct speeds times corrections, many equal, some spread."""
    speeds = [10 ** rng.uniform(-13, -8) for _ in range(rng.randint(1, 6))]
    return sorted(rng.choice(speeds) * (1.0 if rng.random() < 0.5 else math.exp(rng.uniform(-1, 1)))
                  for _ in range(n))


def test_entry_is_the_largest_count_of_its_float_rule() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        key = 10 ** rng.uniform(-12, 3)
        k = rng.choice((1, 2, 3, 7, 50, 999, rng.randint(1, 20_000)))
        # a horizon within rounding of the k-th boundary, or anywhere
        a = key * (k + 1e-9) * (1 + rng.choice((0.0, 1e-16, -1e-16, 3e-16, -3e-16, rng.uniform(-1e-6, 1e-6))))
        cut = rng.choice((math.inf, key * (1 + rng.uniform(-1e-15, 1e-15)), key * rng.uniform(0.5, 2)))
        assert entry(key, a, cut) == brute(key, a, cut, 30_000), (key, a, cut)
    for _ in range(500):   # counts far past any queue: still the last k of the rule where floats tell k apart
        key, a = 10 ** rng.uniform(-12, 0), 10 ** rng.uniform(5, 12)
        m = entry(key, a, math.inf)
        if 0 < m < 1 << 50:
            assert key < a / (m + 1e-9) and not key < a / (m + 1 + 1e-9)


def test_sums_is_the_sum_of_entries_over_the_keys() -> None:
    rng = random.Random(2)
    for _ in range(400):
        keys = random_keys(rng, rng.choice((0, 1, 3, 16, 17, 40, 300)))
        pivot = keys[rng.randrange(len(keys))] if keys else 1e-9
        a_lo = pivot * rng.choice((1.0, 1 + 1e-12, 2.5, 30.0, 400.0, 5000.0)) * rng.uniform(0.999, 1.001)
        a_hi = a_lo * rng.choice((1.0, 1 + 1e-12, 1 + 1e-6, 1.5))
        cut_lo = rng.choice((math.inf, pivot * rng.uniform(0.5, 3)))
        cut_hi = cut_lo * rng.choice((1.0, 1 + 1e-12))
        lo, hi, complete = sums(keys, a_lo, a_hi, cut_lo, cut_hi, math.inf)
        want_lo = sum(entry(k, a_lo, cut_lo) for k in keys)
        want_hi = sum(entry(k, a_hi, cut_hi) for k in keys)
        if complete:
            assert (lo, hi) == (want_lo, want_hi), (keys, a_lo, a_hi, cut_lo, cut_hi)
        else:   # ran past ROUNDS task counts: what it has is a partial count, never more than the full one
            assert lo <= want_lo and hi <= want_hi
            assert bisect.bisect_left(keys, min(a_hi / (ROUNDS + 1e-9), cut_hi)) > 0
        stop = rng.randint(0, max(want_lo, 1))   # stopped once the lower count reaches ``stop``: a lower bound still
        lo_s, _, complete_s = sums(keys, a_lo, a_hi, cut_lo, cut_hi, stop)
        assert lo_s <= want_lo and (complete_s or lo_s >= stop or lo_s == lo)


def walk_count(now: float, mine: float, runtime: float, deadline: float | None) -> int:
    """``SoonestGate._ahead`` for an idle rival (free now, no window)."""
    my_end = now + mine
    if now >= my_end or runtime <= 0:
        return 0
    n = ceil_count((my_end - now) / runtime - 1e-9) - 1
    if n <= 0 or (deadline is not None and now + runtime > deadline):
        return 0
    return n


REQ = Requirements()


def rival_case(rng: random.Random) -> tuple[float, float, float, float, float, float | None]:
    """(now, mine, key, scale, runtime, deadline): the rival's runtime and key from the predictor's arithmetic
    (``base_seconds`` x a learned correction), the asker's end placed within rounding of a task boundary."""
    now = rng.choice(NOWS) + rng.choice((0.0, rng.uniform(0, 1e5)))
    gflops = 10 ** rng.uniform(-2, 6)
    caps = Capabilities.from_dict({"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": gflops}})
    factor = math.exp(rng.uniform(-6.9, 6.9))
    if rng.random() < 0.5:
        scale = float(rng.choice((1, 2, 3, 1000, rng.randint(1, 10**6), 2 * 4096**3 * 100, 1e18)))
        per_flop, per_byte = base_seconds(Cost(flops=1.0), caps, REQ, {}), base_seconds(Cost(bytes=1.0), caps, REQ, {})
        size = rng.choice((0.0, 1.0, scale / 1e3, scale * per_flop / per_byte * (1 - 1e-9)))
        if not size * (per_byte / per_flop) <= scale * (1 - 1e-9):
            size = 0.0   # bytes that set the runtime: the tally leaves those tasks to the walk (``Members.ratio``)
        cost = Cost(flops=scale, bytes=size)
        key = per_flop * factor
    else:
        scale = rng.choice((1.0, 1e-3, 0.1, 10.0, rng.uniform(1e-6, 1e4)))
        cost = Cost(seconds=scale)
        key = base_seconds(Cost(seconds=1.0), caps, REQ, {}) * factor
    runtime = base_seconds(cost, caps, REQ, {}) * factor   # Predictor.predict's product
    k = rng.choice((1, 2, 3, 10, rng.randint(1, 5000)))
    wiggle = rng.choice((0.0, 2.2e-16, -2.2e-16, 1e-15, -1e-15, 1e-13, -1e-13, rng.uniform(-1e-9, 1e-9)))
    mine = runtime * (k + 1e-9) * (1 + wiggle)
    if rng.random() < 0.2:   # a horizon of a few ulps of the epoch: the sum now + mine rounds it away
        mine = math.ulp(now) * rng.choice((0.5, 1, 1.5, 2, 3, 7))
    deadline = None
    if rng.random() < 0.4:
        deadline = now + runtime * (1 + rng.choice((0.0, 1e-16, -1e-16, 1e-12, -1e-12, rng.uniform(-1e-3, 1e-3))))
    return now, mine, key, scale, runtime, deadline


def bracket_misses(cases: int, seed: int) -> int:
    """Cases where the walk's count falls outside ``entry``'s bounds from ``bounds``."""
    rng = random.Random(seed)
    misses = 0
    for _ in range(cases):
        now, mine, key, scale, runtime, deadline = rival_case(rng)
        if not 0 < mine < math.inf:
            continue
        a_lo, a_hi, cut_lo, cut_hi = bounds(now, mine, scale, deadline)
        exact = walk_count(now, mine, runtime, deadline)
        if not entry(key, a_lo, cut_lo) <= exact <= entry(key, a_hi, cut_hi):
            misses += 1
    return misses


def test_the_bounds_bracket_the_walks_count_near_every_boundary() -> None:
    assert bracket_misses(20_000, 3) == 0


def test_the_bracket_needs_its_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same cases without the epoch's ulps or the relative slack: some fall outside (the test above would
    catch a slack made too small)."""
    monkeypatch.setattr(tally, "ULPS", 0.0)
    assert bracket_misses(20_000, 3) > 0
    monkeypatch.setattr(tally, "ULPS", 2.0)
    monkeypatch.setattr(tally, "EPS", 0.0)
    assert bracket_misses(20_000, 3) > 0
