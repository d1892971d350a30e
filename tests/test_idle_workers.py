"""A light footprint when idle: workers start when work arrives and exit after ``worker_idle_minutes``
without work, so an idle agent is its daemon alone. Real worker processes; the agent test runs
``panal agent run`` against ``panal hub serve`` and watches the worker's pid disappear."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for, wait_for_async

from agent.engine.runner import TaskRequest, WorkerPool
from agent.volunteer.preferences import PreferenceError, set_preference

ENV = {"PANAL_TEST_KINDS": "1", "PANAL_WORKER_PRELOAD": "0"}


def sleep_request(tmp: Path, seconds: float) -> TaskRequest:
    return TaskRequest(kind="sleep", params={"seconds": seconds}, timeout_s=60, workdir=str(tmp / "w"))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_an_idle_worker_is_retired_and_a_busy_one_is_not(tmp_path: Path) -> None:
    pool = WorkerPool(1, ENV)
    try:
        assert pool.alive == 0   # nothing starts before work arrives
        async with pool.worker() as worker:
            running = asyncio.ensure_future(worker.run(sleep_request(tmp_path, 1.0)))
            await wait_for_async(lambda: worker.alive, "the worker to start for its first task")
            pid = worker.proc.pid
            assert await pool.retire_idle(0) == 0   # in use: left alone
            assert (await running).ok
        assert pool.alive == 1 and not gone(pid)   # warm for the next task
        assert await pool.retire_idle(3600) == 0   # not idle long enough
        assert await pool.retire_idle(0) == 1
        await wait_for_async(lambda: gone(pid), "the retired worker's process to exit")
        assert pool.alive == 0
        async with pool.worker() as worker:   # the next task starts a fresh one
            assert (await worker.run(sleep_request(tmp_path, 0))).ok
            assert worker.proc is not None and worker.proc.pid != pid
    finally:
        await pool.close()


async def test_a_worker_started_while_the_agent_is_paused_waits_stopped(tmp_path: Path) -> None:
    pool = WorkerPool(1, ENV)
    try:
        pool.suspend_all()   # paused before any worker exists
        async with pool.worker() as worker:
            assert worker.proc is not None
            pid = worker.proc.pid
            await wait_for_async(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED,
                                 "the new worker to be stopped like the paused agent's others")
            pool.resume_all()
            assert (await worker.run(sleep_request(tmp_path, 0))).ok
    finally:
        await pool.close()


def test_worker_idle_minutes_is_a_validated_preference(tmp_path: Path) -> None:
    prefs = tmp_path / "prefs.yaml"
    assert set_preference(prefs, "worker_idle_minutes", "never").worker_idle_minutes is None
    assert set_preference(prefs, "worker_idle_minutes", "0.5").worker_idle_minutes == 0.5
    with pytest.raises(PreferenceError, match="worker_idle_minutes"):
        set_preference(prefs, "worker_idle_minutes", "-1")


def agent_status(home: Path) -> dict[str, Any]:
    out = panal("agent", "status", "--json", home=home, check=False)
    return dict(json.loads(out.stdout)) if out.returncode == 0 else {}


def worker_pids(agent_pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(agent_pid).children(recursive=True) if not gone(p.pid)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.timeout(scaled(300))
def test_an_idle_agent_is_its_daemon_alone(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    home = tmp_path / "agent"
    panal("agent", "join", url, home=home)
    (home / "prefs.yaml").write_text("pause_on_battery: false\nworker_idle_minutes: 0.02\n")   # 1.2 s
    agent = procs.start("agent", "run", "--slots", "1", "--threads", "1", home=home, PANAL_WORKER_PRELOAD="0")
    wait_for(lambda: agent_status(home).get("boards") and all(b["registered"] for b in agent_status(home)["boards"]),
             "the agent to register and poll", timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    assert agent_status(home)["workers"] == 0 and worker_pids(agent.pid) == []   # no worker before work
    manifest = tmp_path / "sleep.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: tick}\n"
                        "spec: {task: sleep, params: {seconds: 2}}\n")
    panal("submit", str(manifest), "--hub", url, home=user, timeout=300)
    # Work arrives: a worker starts for it ...
    pids = wait_for(lambda: worker_pids(agent.pid), "a worker to start for the task", diagnose=procs.logs_text)
    # ... runs it, stays warm for a moment, then exits: its pid disappears.
    wait_for(lambda: agent_status(home).get("done") == 1, "the task to finish", diagnose=procs.logs_text)
    wait_for(lambda: all(gone(pid) for pid in pids) and agent_status(home)["workers"] == 0,
             "the idle worker to exit", diagnose=procs.logs_text)
    assert worker_pids(agent.pid) == [] and agent.poll() is None
