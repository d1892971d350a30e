"""Who is connected, as kept by ``hub/presence.py``, against the rule applied to every agent directly.

Presence keeps its members by events and a heap of times to look again, so that no pick scans the fleet. The
board's clock is wall time: an NTP step can set it back, and a pause told to an agent can be shorter than the
one before it. After each, the kept members and free-slot holders must be those the rule names
(``Presence.is_connected``, the predicate the board applies to one agent), or a policy counts a ghost as a
rival (a laptop never given the work) or forgets an agent that is still asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import test_dispatch
from test_dispatch import cpu_caps

from hub.fleet import slots_of

Hub = test_dispatch.Hub
hubs = test_dispatch.hubs   # the fixture: a real board (SQLite store) on a clock the test moves
FIFO = "priority-fifo"


def kept(h: Hub) -> tuple[set[str], set[str]]:
    """Connected and idle as the indexes read them (each read refreshes presence first)."""
    context = h.board._dispatcher.context
    return {a.row.id for a in context.connected()}, {a.row.id for a in context.idle()}


def ruled(h: Hub) -> tuple[set[str], set[str]]:
    """Connected and idle by the rule, agent by agent."""
    fleet, now = h.board._fleet, h.clock.now
    connected = {a.row.id for a in fleet.agents.values() if fleet.is_connected(a, now)}
    return connected, {i for i in connected if len(fleet.agents[i].running) < slots_of(fleet.agents[i])}


def agree(h: Hub) -> set[str]:
    now = kept(h)
    assert now == ruled(h)
    return now[0]


async def test_an_agent_dropped_past_its_horizon_stays_dropped_when_the_clock_goes_back(
        hubs: Callable[..., Any]) -> None:
    """Dropped once its seen horizon passed; the clock is then set back to before that horizon. The agent has
    been silent for longer than the horizon all the same (the clock moved, not the agent): it stays dropped.
    Read in the clock's new time, its seen time lies 150 s earlier than it was noted."""
    h: Hub = await hubs(FIFO, lease_ttl_s=600, max_poll_wait_s=30)      # seen horizon: 605 s
    quiet, busy = await h.agent("quiet", cpu_caps()), await h.agent("busy", cpu_caps())
    assert agree(h) == {quiet.id, busy.id}
    h.clock.now += 500
    assert await h.board.lease(busy.id, 1, 0) == []                     # busy asks again; quiet says nothing
    h.clock.now += 200                                                  # past quiet's horizon
    assert agree(h) == {busy.id}
    h.clock.now -= 150                                                  # an NTP step back
    assert agree(h) == {busy.id}
    h.clock.now += 100
    assert agree(h) == {busy.id}


async def test_an_agent_silent_since_a_clock_step_back_leaves_a_horizon_after_it_not_a_step_later(
        hubs: Callable[..., Any]) -> None:
    """The hub's clock ran an hour fast and NTP sets it back. An agent seen just before the step and silent
    since counted as seen an hour "ahead": connected (a rival policies counted on, never given the work) for an
    hour and its horizon. Read in the clock's new time it leaves a horizon after it was last seen."""
    h: Hub = await hubs(FIFO)                                         # seen horizon: 45 s
    gone, other = await h.agent("gone", cpu_caps()), await h.agent("other", cpu_caps())
    assert await h.board.lease(gone.id, 1, 0) == []
    h.clock.now -= 3600                                                 # the step
    assert agree(h) == {gone.id, other.id}
    h.clock.now += 60                                                   # a minute later, in any clock
    assert await h.board.lease(other.id, 1, 0) == []
    assert agree(h) == {other.id}


async def test_a_pause_told_before_a_clock_step_back_ends_when_it_was_told_to(hubs: Callable[..., Any]) -> None:
    """Told to ask again in 300 s, then the clock is set back an hour: the agent asks again 300 s later by its
    own clock (it counts its pause, not the hub's time), so it is overdue 300 + 20 s after it was told, not an
    hour later (when the pause would end by the numbers the hub kept)."""
    h: Hub = await hubs(FIFO)
    paused = await h.agent("paused", cpu_caps())
    tell_pauses(h, 300.0)
    assert await h.board.lease(paused.id, 1, 0) == []
    assert h.board.retry_after(paused.id) == 300.0
    h.clock.now -= 3600
    assert agree(h) == {paused.id}
    h.clock.now += 310
    assert agree(h) == {paused.id}                                     # within 300 s + 20 s
    h.clock.now += 20
    assert agree(h) == set()                                           # overdue


async def test_an_agent_dropped_at_the_end_of_its_window_is_connected_again_when_the_clock_goes_back(
        hubs: Callable[..., Any]) -> None:
    h: Hub = await hubs(FIFO, lease_ttl_s=600, max_poll_wait_s=30)
    leaving = await h.agent("leaving", cpu_caps(available_until=h.clock.now + 100, slots=2))
    h.clock.now += 150                                                  # its window has ended
    assert agree(h) == set()
    h.clock.now -= 100                                                  # back inside its window
    assert agree(h) == {leaving.id}


def tell_pauses(h: Hub, pause_s: float) -> None:
    """Every idle agent is told to pause exactly ``pause_s`` (no jitter: the bounds meet)."""
    pacing = h.board._dispatcher.pacing
    pacing.config = replace(pacing.config, min_poll_interval_s=pause_s, max_poll_interval_s=pause_s)


async def test_a_shorter_pause_than_the_last_one_ends_the_agents_presence_sooner(hubs: Callable[..., Any]) -> None:
    """With the defaults a pause outlasts the seen horizon (45 s against pauses up to 300 s), so the pause
    decides when an idle agent drops out. Told 300 s and then, asking again, 50 s, it is overdue 70 s
    later (50 + the 20 s long poll), not when the first pause would have been."""
    h: Hub = await hubs(FIFO)
    idle = await h.agent("idle", cpu_caps())
    tell_pauses(h, 300.0)
    assert await h.board.lease(idle.id, 1, 0) == []
    assert h.board.retry_after(idle.id) == 300.0
    h.clock.now += 1
    tell_pauses(h, 50.0)
    assert await h.board.lease(idle.id, 1, 0) == []
    assert h.board.retry_after(idle.id) == 50.0
    h.clock.now += 60
    assert agree(h) == {idle.id}                                       # within 50 s + 20 s
    h.clock.now += 20
    assert agree(h) == set()                                           # overdue: the first pause is no longer told


async def test_a_long_poll_woken_after_the_clock_went_back_is_seen_at_the_earlier_time(
        hubs: Callable[..., Any]) -> None:
    """An agent parked in a long poll while the clock is set back is seen again when woken, at a time earlier
    than its last: its horizon moves earlier, and presence must drop it then, not at the old horizon."""
    h: Hub = await hubs(FIFO, lease_ttl_s=600, max_poll_wait_s=30)      # seen horizon: 605 s
    parked, other = await h.agent("parked", cpu_caps()), await h.agent("other", cpu_caps())
    poll = asyncio.create_task(h.board.lease(parked.id, 1, 0.3))
    waiters = h.board._dispatcher.waiters
    while not len(waiters):
        await asyncio.sleep(0.01)
    h.clock.now -= 100                                                  # the clock steps back
    assert await h.board.lease(other.id, 1, 0) == []                    # a pick reads presence meanwhile
    h.board._dispatcher.wake()                                          # woken (nothing for it): seen now
    assert await poll == []
    h.clock.now += 650                                                  # past the new horizon, not the old
    assert agree(h) == set()


async def test_an_agent_registered_while_the_clock_steps_back_is_seen_at_the_new_time(
        hubs: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration's seen time is taken before its row is written; the clock is set back an hour during the
    write. The agent, silent after registering, leaves a horizon later, not an hour and a horizon later."""
    h: Hub = await hubs(FIFO)                                         # seen horizon: 45 s
    store, write = h.board.store, h.board.store.upsert_agent

    async def stepped(row: Any) -> None:
        h.clock.now -= 3600                                             # NTP steps the clock meanwhile
        await write(row)

    monkeypatch.setattr(store, "upsert_agent", stepped)
    late = await h.agent("late", cpu_caps())
    monkeypatch.setattr(store, "upsert_agent", write)
    assert agree(h) == {late.id}
    h.clock.now += 60
    assert agree(h) == set()


async def test_an_agent_stored_by_a_clock_since_set_back_is_not_connected_a_horizon_after_a_restart(
        tmp_path: Path) -> None:
    """The hub's clock ran an hour fast while an agent registered (its row says so); the hub restarts with the
    clock set right. The agent, silent since, is not connected for the hour its row is ahead."""
    fast = Hub(tmp_path, FIFO)
    fast.clock.now += 3600
    await fast.board.start()
    try:
        silent = await fast.agent("silent", cpu_caps())
    finally:
        await fast.board.stop()
    h = Hub(tmp_path, FIFO)                                             # the same database, the right time
    await h.board.start()
    try:
        assert silent.id in h.board.agents
        h.clock.now += 60
        assert agree(h) == set()
    finally:
        await h.board.stop()
