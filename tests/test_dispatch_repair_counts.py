"""A repair of a kept ``fastest`` cover counts each rival once, as the scan does.

A repair counts first the agents something happened to since the cover was made (``Covers.asked_since``), then
the agents after the cover's last one in the kind order. A rival it counts whose part cannot be kept (its
predicted end within a millisecond of its window or the deadline, or connected only by its lease) is not in the
cover's parts afterwards; if it also stands after the cover's last position, the second loop counted it again,
and the doubled sum told a slower asker to take none where the scan gives it work.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, GTX1060, cpu_caps
from test_dispatch_hostile_reports import SLOT_LIES, LeaseChurn, pace
from test_dispatch_indexes import Fleet

from hub.dispatch.adaptive import Adaptive
from hub.dispatch.fastest import Fastest
from security.identity import Identity

fleets = test_dispatch_indexes.fleets   # the fixture: a real board per policy


@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_a_repair_counts_a_rival_whose_part_it_cannot_keep_only_once(fleets: Callable[..., Any],
                                                                        policy: str) -> None:
    f: Fleet = await fleets(policy)
    t0 = f.clock.now
    asker = await f.agent("asker", {"memory_gb": 16, "cpu": {"cores": 4, "gflops_fp32": 200.0}})
    a100 = await f.agent("a100", A100)
    first = await f.submit(60)
    assert await f.lease(asker) == []          # the A100 alone finishes ~97 first: covered, walk stops after it
    board, context = f.board, f.board._dispatcher.context
    gate_policy = board.policy
    assert isinstance(gate_policy, Fastest | Adaptive)
    queues = context.queues
    job, req = queues.job(first), queues.requirements(first)
    [task] = queues.peek(first, 1)
    # a GTX joins whose predicted end, asked at ``now``, falls half a millisecond before its window closes: it
    # counts in the scan (it fits), but its part holds for less than the hold margin (not kept)
    gtx = await f.agent("gtx", {**GTX1060, "available_until": t0 + 100})
    runtime = gate_policy.predictor.predict(board.agents[gtx.id], job, task, req)
    f.clock.now = t0 + 100 - runtime - 0.0005
    second = await f.submit(130)               # same group: the cover is asked again, and is short (97 < 130)
    assert a100 and second
    f.check(untouched=True)
    taken = await f.lease(asker)
    assert len(taken) == 1                      # the scan: 97 + ~21 < 130, the asker takes one


#: reports agents switch between: SLOT_LIES's float-edge speeds and slot lies, and plain cards
MIX: list[dict[str, Any]] = [*SLOT_LIES, A100, GTX1060, cpu_caps(), {**A100, "slots": 2}]


async def _window_at_the_margin(f: Fleet, ident: Identity, rng: random.Random, step: int) -> None:
    """The agent registers again with a window that ends at (or within a few milliseconds of) its predicted end
    for a queued job's head task: a part that fits the window but holds for less than the hold margin."""
    context, predictor = f.board._dispatcher.context, f.board.policy.predictor
    assert predictor is not None
    waiting = list(context.queues.waiting())
    if not waiting:
        return
    job_id = rng.choice(waiting)
    head = context.queues.peek(job_id, 1)
    if not head:
        return
    caps = dict(rng.choice(MIX))
    await f.agent(f"w{step}", caps, identity=ident)
    agent = f.board.agents[ident.id]
    runtime = predictor.predict(agent, context.queues.job(job_id), head[0], context.queues.requirements(job_id))
    if runtime < 1e6:
        until = f.clock.now + runtime + rng.choice((0.0, 0.0004, 0.0009, 0.001, 0.0011, 0.002, 5.0))
        await f.agent(f"w{step}", {**caps, "available_until": until}, identity=ident)


def _to_a_deadline_margin(f: Fleet, ident: Identity, rng: random.Random) -> None:
    """The clock moves to a millisecond or less before the moment the agent's head task would miss a deadline."""
    context, predictor = f.board._dispatcher.context, f.board.policy.predictor
    assert predictor is not None
    queues = context.queues
    waiting = [j for j in queues.waiting() if queues.job(j).deadline_at is not None]
    agent = f.board.agents.get(ident.id)
    if not waiting or agent is None:
        return
    job_id = rng.choice(waiting)
    head, deadline = queues.peek(job_id, 1), queues.job(job_id).deadline_at
    if head and deadline is not None:
        runtime = predictor.predict(agent, queues.job(job_id), head[0], queues.requirements(job_id))
        moment = deadline - runtime - rng.choice((0.0, 0.0004, 0.0009, 0.0011))
        if moment > f.clock.now:
            f.clock.now = moment


#: seeds whose churn told an asker none from a repair that counted a rival twice (before the fix)
@pytest.mark.parametrize("seed", [11, 28, 43, 44, 53, 58])
@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_rivals_at_window_and_deadline_margins_keep_the_scans_answers_through_churn(
        fleets: Callable[..., Any], policy: str, seed: int) -> None:
    """Agents join, take and finish work, register again with windows ending at their predicted end (to the
    millisecond), the clock stops a millisecond short of deadlines and steps back a little; after every event
    each agent's kept share (from a copy of the covers) equals the scan's."""
    rng = random.Random(seed)
    f: Fleet = await fleets(policy)
    pace(f, rng.choice((0.0, 20.0)))
    agents = [await f.agent(f"v{i}", rng.choice(MIX)) for i in range(rng.randint(3, 10))]
    jobs = [await f.submit(rng.randint(5, 150)), await f.submit(rng.randint(3, 30), requires={"device": "gpu"})]
    churn = LeaseChurn(f, rng)
    compared = 0
    for step in range(150):
        ident = rng.choice(agents)
        event = rng.randrange(16)
        if event == 0:
            await f.agent(f"v{step}", rng.choice(MIX), identity=ident)
        elif event == 4:
            deadline = {"policy": {"deadline": f"{rng.randint(1, 60)}m"}} if rng.random() < 0.5 else {}
            jobs.append(await f.submit(rng.randint(1, 150), **deadline))
        elif await churn.event(event, ident, jobs, (0.49, 0.5, 0.51, 1.0, 0.2, 3.0), (0.01,)):
            pass
        elif event == 10 and rng.random() < 0.3:
            f.clock.now -= rng.choice((0.3, 3.0, 30.0))
        elif event in (11, 12):
            await _window_at_the_margin(f, ident, rng, step)
        elif event == 13:
            agents.append(await f.agent(f"n{step}", rng.choice(MIX)))
        elif event == 14:
            _to_a_deadline_margin(f, ident, rng)
        else:
            f.clock.now += rng.choice((0.2, 0.7, 5.0, 40.0))
        compared += f.check(untouched=True)
    assert compared > 0
