"""``fastest`` and ``adaptive`` answer from sorted runtimes (``hub/dispatch/tally.py``) where its bounds settle
the question, and leave the rest to covers and walks; either way the answer is the scan's.

``Fleet.check`` (test_dispatch_indexes.py) asks every agent for every job through a gate with the tally and
compares it with the rule applied to every connected agent; these tests put the tally in the cases it treats
apart (busy rivals past what it judges one by one, windows ending within the asker's task, costs in seconds,
costs whose bytes set some runtimes, a clock step back) and check that it, not a walk, answered where it can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, GTX1060, cpu_caps
from test_dispatch_indexes import Fleet

from hub.dispatch import tally
from hub.dispatch.adaptive import Adaptive
from hub.dispatch.fastest import Fastest

fleets = test_dispatch_indexes.fleets   # the fixture: a real board per policy


def policy_of(f: Fleet) -> Fastest | Adaptive:
    policy = f.board.policy
    assert isinstance(policy, Fastest | Adaptive)
    return policy


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_a_slow_asker_is_told_none_from_the_sorted_runtimes_without_a_walk(fleets: Callable[..., Any],
                                                                                 policy: str) -> None:
    f: Fleet = await fleets(policy)
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(12):
        await f.agent(f"a100-{i}", A100)
    await f.submit(400)
    assert await f.lease(laptop) == []
    # a walk keeps what it counted as a cover; the tally answered first, so none was needed
    assert len(policy_of(f).covers) == 0
    assert f.check() > 0


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_busy_rivals_past_those_judged_one_by_one_keep_the_scans_answers(fleets: Callable[..., Any],
                                                                              policy: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With more busy rivals free before the asker would finish than ``LOOK``, they count in the upper bound as
    if idle and the earliest ``LOOK`` of them, judged, in the lower one."""
    monkeypatch.setattr(tally, "LOOK", 2)
    f: Fleet = await fleets(policy)
    gpus = [await f.agent(f"gtx-{i}", GTX1060) for i in range(6)]
    laptops = [await f.agent(f"laptop-{i}", cpu_caps()) for i in range(2)]
    await f.submit(9)
    for gpu in gpus:                      # each takes one: busy for its task (~3 s), free long before a laptop ends
        assert len(await f.lease(gpu)) == 1
        f.clock.now += 0.25
    assert f.check() > 0
    assert await f.lease(laptops[0]) == []   # 6 busy GPUs finish the 3 left first
    await f.submit(400)                       # far more than the GPUs clear before a laptop would finish one
    assert f.check() > 0
    assert len(await f.lease(laptops[1])) == 1


async def test_a_window_ending_within_the_askers_task_is_judged_by_the_walks_rule(fleets: Callable[..., Any]) -> None:
    """A rival counts while its next task ends within its window (the walk's rule): an A100 leaving in 30 s still
    finishes ~97 before a laptop would finish one, until its next 0.7 s task no longer fits."""
    f: Fleet = await fleets("fastest")
    laptop = await f.agent("laptop", cpu_caps())
    closing = await f.agent("closing", {**A100, "available_until": f.clock.now + 30})
    await f.submit(20)
    assert f.check() > 0
    assert await f.lease(laptop) == []
    f.clock.now += 29.5
    assert closing.id in f.connected()
    assert f.check() > 0
    assert len(await f.lease(laptop)) == 1


async def test_tasks_that_cost_fixed_seconds_are_counted_by_their_agents_corrections(
        fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("fastest")
    quick, slow = await f.agent("quick", cpu_caps()), await f.agent("slow", cpu_caps())
    await f.submit(1, task="sleep", params={}, sweep={"seconds": [10]})
    [task] = await f.lease(quick)
    f.clock.now += 10
    await f.finish(quick, task, wall_s=2.5)   # learned: it runs a 10 s sleep in 2.5 s
    await f.submit(3, task="sleep", params={}, sweep={"seconds": [10, 10, 10]})
    assert f.check() > 0
    assert await f.lease(slow) == []          # quick finishes all 3 before slow would finish one
    assert len(await f.lease(quick)) == 1
    assert f.check() > 0


async def test_a_clock_step_back_starts_the_sorted_runtimes_over(fleets: Callable[..., Any]) -> None:
    f: Fleet = await fleets("adaptive")
    laptop = await f.agent("laptop", cpu_caps())
    gpus = [await f.agent(f"gtx-{i}", GTX1060) for i in range(3)]
    await f.submit(30)
    for gpu in gpus:
        assert len(await f.lease(gpu)) == 1
    assert f.check() > 0
    f.clock.now += 3600
    assert f.check() > 0                      # the GPUs' predicted ends have passed: free in the tally's eyes
    f.clock.now -= 3590                       # ... and are ahead again after the step back
    assert f.check() > 0
    assert await f.lease(laptop) == []


async def test_a_submitters_many_distinct_requirements_build_one_list_a_pick_and_keep_at_most_the_cap(
        fleets: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each list holds every capable connected agent: building one is a visit to each. A pick builds one at most,
    never in place of a list it uses, and questions without a list go to the walk (same answers)."""
    monkeypatch.setattr(tally, "LISTS_MAX", 3)
    f: Fleet = await fleets("fastest")
    for i in range(4):
        await f.agent(f"gtx-{i}", GTX1060)
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(6):   # six requirements every agent here meets: six lists
        await f.submit(50, requires={"min_memory_gb": 1 + i / 10})
    kept = policy_of(f).tally
    assert kept is not None
    for built in (1, 2, 3, 3, 3):   # the GPUs finish each queue first: the laptop is told none for all six
        assert await f.lease(laptop) == []
        assert len(kept._lists) == built
    assert f.check() > 0
    assert len(kept._lists) == 3


async def test_agents_claiming_no_speed_at_all_do_not_turn_the_tally_off(fleets: Callable[..., Any]) -> None:
    """A report of ~0 GFLOPS gives an infinite runtime (it finishes nothing first) and a report of no device speed
    at all a default: kept out of the sorted lists, such keys are not judged one by one, so a stranger's hundred
    of them leave the tally answering (more than ``LOOK`` judged one by one would send every ask to the walk)."""
    f: Fleet = await fleets("fastest")
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(tally.LOOK + 6):
        await f.agent(f"liar-{i}", {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 1e-320}})
    for i in range(12):
        await f.agent(f"a100-{i}", A100)
    await f.submit(400)
    assert await f.lease(laptop) == []
    assert len(policy_of(f).covers) == 0   # answered without a walk
    assert f.check() > 0


async def test_adaptives_flaky_agents_are_not_judged_one_by_one(fleets: Callable[..., Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents ``adaptive`` may avoid (error rate above its limit) are rivals in the upper bound only: a volunteer
    fleet with more of them than ``LOOK`` still has its asks answered by the tally, as the scan answers them."""
    monkeypatch.setattr(tally, "LOOK", 2)
    f: Fleet = await fleets("adaptive")
    flaky = [await f.agent(f"flaky-{i}", GTX1060) for i in range(4)]
    await f.submit(12, policy={"retries": 5})
    for _ in range(3):
        for agent in flaky:
            [task] = await f.lease(agent)
            assert await f.fail(agent, task) == "accepted"
    policy = policy_of(f)
    assert isinstance(policy, Adaptive) and len(policy.errors.flagged("matmul")) == 4
    laptop = await f.agent("laptop", cpu_caps())
    for i in range(12):
        await f.agent(f"a100-{i}", A100)
    await f.submit(400)
    assert await f.lease(laptop) == []
    assert len(policy.covers) == 0   # answered without a walk
    assert f.check() > 0
