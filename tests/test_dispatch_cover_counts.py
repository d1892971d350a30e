"""A kept cover's count (``covers.Cover``) is a lower bound of what the walk would count, strong enough to spare it.

The walk's count at a horizon is the sum over rivals of ``finishes``; a cover answers from its parts without
visiting anyone. These tests build covers from parts directly (the parts a walk would keep) and check that the
sorted marks never count a task ``finishes`` would not, that every part counts (not only the first 128), that a
rival counted mid-task counts as free once its free time has passed, and that the learned floor the walk bounds
the unvisited agents by is the smallest correction of the agents that are not quick.
"""

from __future__ import annotations

import math
import random

from hub.dispatch.covers import MARGIN_S, MARKS, Cover, Covers, finishes
from hub.dispatch.predict import FLOOR, Predictor
from hub.records import JobRow, JobState, TaskRow
from jobs.requirements import Capabilities, Requirements


def _lower(cover: Cover, horizon: float, now: float) -> int:
    """What the parts finish at ``horizon`` asked at ``now`` (each rival free at max(its free time, now))."""
    elapsed = now - cover.at
    return sum(min(max(finishes(horizon, max(offset - elapsed, 0.0), runtime), 0), MARKS)
               for offset, runtime, _ in cover.parts.values())


def test_marks_never_count_more_than_finishes() -> None:
    rng = random.Random(7)
    for _ in range(200):
        cover = Cover("g", 1_700_000_000.0)
        for i in range(rng.randrange(1, 60)):
            offset = rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 1e5)])
            cover.add(f"r{i}", offset, rng.choice([rng.uniform(1e-3, 0.1), rng.uniform(0.1, 1e4)]), math.inf)
        for now in sorted(cover.at + rng.choice([0.0, rng.uniform(0, 10), rng.uniform(0, 1e5)]) for _ in range(20)):
            horizon = rng.choice([rng.uniform(0, 0.5), rng.uniform(0, 50), rng.uniform(0, 1e5)])
            assert cover.reach(horizon, now) <= _lower(cover, horizon, now)


def test_marks_aged_to_a_later_time_count_nothing_when_the_clock_goes_back() -> None:
    cover = Cover("g", 1_700_000_000.0)
    cover.add("busy", 2.0, 0.01, math.inf)
    assert cover.reach(0.05, cover.at + 3.0) == 4
    assert cover.reach(0.05, cover.at + 1.0) == 0 == _lower(cover, 0.05, cover.at + 1.0)


def test_a_mark_on_the_edge_is_not_counted() -> None:
    """Right at the horizon where ``finishes`` reaches one task, the mark does not count it yet."""
    cover = Cover("g", 1_700_000_000.0)
    cover.add("r", 0.0, 0.01, math.inf)
    edge = MARGIN_S + 0.01 * (1 + 1e-9)   # finishes(edge) == 0; a little above, 1
    assert finishes(edge, 0.0, 0.01) <= 0 and cover.reach(edge, cover.at) == 0
    assert finishes(edge * 1.01, 0.0, 0.01) == 1 and cover.reach(edge * 1.01, cover.at) == 1


def test_a_cover_of_hundreds_of_one_task_parts_answers_without_a_walk() -> None:
    """300 rivals each finishing one task first: the all-at-once sum loses a task a part and the part-by-part
    sum looked at 128, so 290 queued tasks sent the asker walking; the marks count all 300."""
    covers = Covers()
    cover = Cover("g", 1_700_000_000.0)
    for i in range(300):
        cover.add(f"r{i}", 0.0, 0.03 + i * 1e-5, math.inf)
    covers.keep("g", cover)
    assert Covers.count(cover, 0.05, 290, cover.at) == 290
    assert covers.covered("g", 0.05, 290, cover.at)
    assert not covers.covered("g", 0.05, 301, cover.at)
    cover.remove("r0")                                  # a rival that asks leaves it, marks and all
    assert cover.reach(0.05, cover.at) == 299


def test_a_rival_counted_mid_task_counts_as_free_once_its_task_should_have_ended() -> None:
    """Counted while busy for another 2 s, a rival with 0.01 s tasks finishes none before an asker needing 0.05 s;
    3 s later (no event of its own in between) it is free, and finishes four first."""
    cover = Cover("g", 1_700_000_000.0)
    cover.add("busy", 2.0, 0.01, math.inf)
    assert cover.reach(0.05, cover.at) == 0
    assert cover.reach(0.05, cover.at + 1.0) == 0       # still busy then
    assert cover.reach(0.05, cover.at + 3.0) == 4
    cover.remove("busy")                                # once counted as free, it still leaves cleanly
    assert cover.reach(0.05, cover.at + 3.0) == 0
    assert cover.reached is not None and not cover.reached.idle


def _job(kind: str = "matmul") -> JobRow:
    return JobRow(id="j", name="j", submitter_id="s", kind=kind, priority=0, state=JobState.RUNNING,
                  created_at=0.0, n_tasks=1, envelope={}, requires={}, timeout_s=60.0, max_attempts=3)


def _settle(predictor: Predictor, agent_id: str, ratio: float, n: int = 8) -> None:
    """``n`` attempts of the agent that took ``ratio`` x their predicted time."""
    for i in range(n):
        task = TaskRow(id=f"{agent_id}-{i}", job_id="j", idx=i, params={})
        predictor.leased[task.id] = (agent_id, 10.0, 0.0, 10.0)
        predictor.attempt_settled(agent_id, _job(), task, True, None, {"wall_s": 10.0 * ratio})


def test_the_walk_bound_uses_the_smallest_correction_of_agents_that_are_not_quick() -> None:
    """With ``FLOOR`` alone, a walk bounded the agents it had not visited as if each ran twice as fast as measured,
    and visited every agent at least half as fast as the asker; the learned floor is what the fleet has shown."""
    predictor = Predictor()
    assert predictor.floor() == 1.0                       # nothing learned: as measured
    _settle(predictor, "steady", 0.8)
    _settle(predictor, "slow", 3.0)
    assert math.isclose(predictor.floor(), 0.8, rel_tol=1e-9)
    _settle(predictor, "quick", 0.2)                      # faster than FLOOR: visited apart, not a bound
    assert "quick" in predictor.quick and math.isclose(predictor.floor(), 0.8, rel_tol=1e-9)
    _settle(predictor, "steady", 1.5, n=30)               # it slows down: the floor follows
    assert math.isclose(predictor.floor(), 1.0)           # (no agent below 1.0 that is not quick)
    _settle(predictor, "slow", 0.6, n=30)
    assert FLOOR <= predictor.floor() < 0.61


def test_runtimes_kept_per_shape_tell_half_precision_and_reports_apart() -> None:
    """Runtimes are kept per (agent, task shape), not per task: a sweep's next task of the same cost reuses it, a
    half-precision task of the same cost does not, and a new report is predicted afresh."""
    from hub.fleet import AgentState

    predictor, job, req = Predictor(), _job(), Requirements.from_dict({})
    gpu = {"name": "RTX 2060", "backend": "cuda", "vram_gb": 6, "gflops_fp32": 6450, "gflops_fp16": 12900}
    caps = Capabilities.from_dict({"kinds": ["matmul"], "cpu": {"cores": 8, "gflops_fp32": 200}, "gpus": [gpu]})
    agent = AgentState.__new__(AgentState)
    agent.caps, agent.row = caps, type("Row", (), {"id": "a"})()   # only what ``base`` reads
    fp32 = [TaskRow(id=f"t{i}", job_id="j", idx=i, params={"size": 2048, "iterations": 50, "seed": i})
            for i in range(2)]
    half = TaskRow(id="h", job_id="j", idx=2, params={"size": 2048, "iterations": 50, "dtype": "float16"})
    first = predictor.base(agent, job, fp32[0], req)
    assert predictor.base(agent, job, fp32[1], req) == first
    assert math.isclose(predictor.base(agent, job, half, req), first / 2, rel_tol=1e-9)
    agent.caps = Capabilities.from_dict({**caps.raw, "gpus": [{**gpu, "gflops_fp32": 12900}]})
    assert math.isclose(predictor.base(agent, job, fp32[1], req), first / 2, rel_tol=1e-9)


def test_rivals_that_leave_and_are_counted_again_at_the_same_offset_age_once() -> None:
    """A busy rival taken out and counted again with the same free time has two entries waiting to age; with a
    walk's worth of rivals coming due at once the marks are sorted again, each rival's once."""
    cover = Cover("g", 1_700_000_000.0)
    for i in range(40):
        cover.add(f"r{i}", 0.06, 0.01, math.inf)
    assert cover.reach(0.05, cover.at) == 0
    for i in range(3):
        cover.remove(f"r{i}")
        cover.add(f"r{i}", 0.06, 0.01, math.inf)
    assert cover.reach(0.05, cover.at + 0.1) == _lower(cover, 0.05, cover.at + 0.1) == 160


def test_a_busy_part_taken_out_and_counted_again_leaves_a_bounded_number_of_entries() -> None:
    """A rival free only a day from now, taken out and counted again 10,000 times (each registration of a liar
    that repeats its report): each time its part left an entry for its aging until the clock passed a day.
    The entries stay within twice the parts, and the counts stay those of the parts."""
    cover = Cover("g", 1_700_000_000.0)
    cover.add("steady", 0.0, 0.01, math.inf)
    assert cover.reach(1.0, cover.at) == MARKS          # the marks are kept from here on
    for i in range(10_000):
        cover.remove("far")
        cover.add("far", 86_400.0 + i * 1e-3, 0.01, math.inf)
    assert cover.reached is not None and len(cover.reached.pending) <= 2 * len(cover.parts) + 64
    assert cover.reach(1.0, cover.at + 1.0) == MARKS == _lower(cover, 1.0, cover.at + 1.0)
    assert cover.reach(1.0, cover.at + 86_500.0) == 2 * MARKS == _lower(cover, 1.0, cover.at + 86_500.0)
