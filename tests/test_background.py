"""Periodic duties survive failures and stop at once; a drain waits for idle, but only so long."""

from __future__ import annotations

import asyncio

import pytest

from hub.background import cancel_all, run_every, wait_drained


async def test_a_periodic_duty_keeps_running_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    third = asyncio.Event()

    async def duty() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        if calls == 3:
            third.set()

    task = run_every(0.01, duty, "test duty")
    await asyncio.wait_for(third.wait(), 10)
    await cancel_all([task])
    assert task.cancelled()
    failures = [r for r in caplog.records if r.getMessage() == "test duty failed; will retry"]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_a_periodic_duty_stops_at_once_even_mid_call() -> None:
    entered = asyncio.Event()
    finished = False

    async def stuck() -> None:
        nonlocal finished
        entered.set()
        await asyncio.Event().wait()
        finished = True

    task = run_every(0, stuck, "stuck duty")
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(cancel_all([task]), 10)
    assert task.cancelled() and not finished


async def test_cancel_all_drops_the_exceptions_of_finished_tasks() -> None:
    async def fails() -> None:
        raise RuntimeError("already dead")

    dead = asyncio.create_task(fails())
    await asyncio.gather(dead, return_exceptions=True)
    await cancel_all([dead, asyncio.create_task(asyncio.Event().wait())])


async def test_a_drain_returns_when_the_work_is_done() -> None:
    busy = True

    async def finish() -> None:
        nonlocal busy
        await asyncio.sleep(0.05)
        busy = False

    finisher = asyncio.create_task(finish())
    assert await wait_drained(lambda: busy, timeout_s=30) is True
    await finisher
    assert await wait_drained(lambda: False, timeout_s=0) is True


async def test_a_drain_gives_up_at_its_deadline() -> None:
    assert await wait_drained(lambda: True, timeout_s=0.05) is False
    assert await wait_drained(lambda: True, timeout_s=0) is False
