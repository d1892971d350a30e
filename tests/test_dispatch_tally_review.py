"""Hostile review of the tally (hub/dispatch/tally.py): events it must hear, bounds it must keep.

Each test drives a real board (``Fleet`` of test_dispatch_indexes.py) into a case the tally could get wrong and
compares every gate, the tally's included, with the scan from scratch (``Fleet.check``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, cpu_caps
from test_dispatch_indexes import Fleet

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
