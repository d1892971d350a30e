"""A repair of a kept ``fastest`` cover counts each rival once, as the scan does.

A repair counts first the agents something happened to since the cover was made (``Covers.asked_since``), then
the agents after the cover's last one in the kind order. A rival it counts whose part cannot be kept (its
predicted end within a millisecond of its window or the deadline, or connected only by its lease) is not in the
cover's parts afterwards; if it also stands after the cover's last position, the second loop counted it again,
and the doubled sum told a slower asker to take none where the scan gives it work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from test_dispatch import A100, GTX1060
from test_dispatch_indexes import Fleet

from hub.dispatch.adaptive import Adaptive
from hub.dispatch.fastest import Fastest


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
