"""A good guest: exclusive apps, separate CPU and GPU rules, how long a pause is expected to last,
the GPU selection by index or UUID, and the real daemon handing back the tasks of a long pause and
counting no compute while paused (a real board, a real warm worker)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Collection, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import InProcessHub
from helpers import wait_for, wait_for_async
from test_preferences import MONDAY, FakeClock, FakeLoad

from agent.daemon import Daemon, DaemonSettings
from agent.daemon.devices import Devices
from agent.daemon.pausing import PauseTracker
from agent.engine.runner import Worker
from agent.host.home import AgentHome
from agent.volunteer.exclusive_apps import running_exclusive
from agent.volunteer.gpu_use import GpuReading
from agent.volunteer.pause_rules import PauseRules
from agent.volunteer.preferences import PreferenceError, Preferences, load_preferences, set_preference
from jobs.requirements import Requirements

UUID0 = "8c3e1a52-1111-2222-3333-444455556666"
UUID1 = "9d4f2b63-aaaa-bbbb-cccc-ddddeeeeffff"


# -- preferences ---------------------------------------------------------------------------------------
def test_defaults_are_those_of_a_good_guest_on_a_gaming_pc() -> None:
    prefs = Preferences()
    assert prefs.max_gpu_memory_fraction == 0.5      # a game fits beside a task (a stopped task keeps its memory)
    assert prefs.gpu_while_in_use is False           # BOINC's default: the GPU waits while the owner is there
    assert prefs.exclusive_apps == () and prefs.exclude_gpus == ()
    assert 0 < prefs.handback_minutes <= 15


def test_gpus_by_index_or_uuid_and_exclusive_apps_parse_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "prefs.yaml"
    assert set_preference(path, "gpus", f"1, GPU-{UUID0.upper()}").gpus == (1, UUID0)
    assert set_preference(path, "exclude-gpus", "0").exclude_gpus == (0,)
    assert set_preference(path, "exclusive_apps", "steam, blender").exclusive_apps == ("steam", "blender")
    prefs = set_preference(path, "gpu_while_in_use", "yes")
    on_disk = yaml.safe_load(path.read_text())
    assert on_disk["gpus"] == [1, UUID0] and on_disk["exclusive_apps"] == ["steam", "blender"]
    assert load_preferences(path) == prefs
    assert (prefs.gpus, prefs.exclude_gpus, prefs.gpu_while_in_use) == ((1, UUID0), (0,), True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("gpus", "GPU-xyz", "UUIDs like GPU-"),
    ("exclude_gpus", "-2", "GPU indices start at 0"),
    ("exclusive_apps", "/usr/bin/steam", "no paths"),
    ("gpu_pause_percent", "150", "between 1 and 100"),
    ("gpu_pause_memory_fraction", "0", "between 0.01 and 1"),
    ("handback_minutes", "soon", "expected a number"),
])
def test_bad_gpu_and_pause_preferences_get_clear_errors(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(PreferenceError) as err:
        set_preference(tmp_path / "prefs.yaml", key, value)
    assert err.value.key == key and message in err.value.message


# -- exclusive apps: real processes -----------------------------------------------------------------
@pytest.fixture
def game(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real program called ``pnl-game`` (a copy of sleep), as a volunteer's game would run."""
    binary = tmp_path / "pnl-game"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "60"])
    wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "pnl-game", "the game to start")
    yield proc
    proc.kill()
    proc.wait()


def test_an_exclusive_app_pauses_all_work_while_it_runs(game: subprocess.Popen[bytes]) -> None:
    clock, load = FakeClock(), FakeLoad()
    prefs = Preferences(exclusive_apps=("PNL-Game", "not-running-here"))
    rules = PauseRules(prefs, load, clock)
    assert running_exclusive(prefs.exclusive_apps) == "PNL-Game"
    paused, reason = rules.evaluate()
    assert paused and reason == "PNL-Game is running (an exclusive app)"
    assert rules.expected_s is None            # nobody can tell how long a game lasts
    game.kill()
    game.wait()
    assert rules.evaluate() == (False, "") and rules.expected_s == 0.0


def test_a_program_with_a_name_longer_than_the_kernel_keeps_is_matched_by_its_command(tmp_path: Path) -> None:
    binary = tmp_path / "pnl-game-with-a-long-name"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "60"])
    try:
        wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "pnl-game-with-a", "it to start")
        assert running_exclusive(["pnl-game-with-a-long-name"]) == "pnl-game-with-a-long-name"
        assert running_exclusive(["pnl-game-with-a-different-name"]) is None
    finally:
        proc.kill()
        proc.wait()


def test_exclusive_apps_never_match_the_agents_own_pids(game: subprocess.Popen[bytes]) -> None:
    assert running_exclusive(["pnl-game"], exclude={game.pid}) is None
    assert running_exclusive([]) is None


# -- separate CPU and GPU rules --------------------------------------------------------------------------
def test_gpu_work_waits_while_the_owner_is_at_the_machine_and_cpu_work_goes_on() -> None:
    clock, load = FakeClock(), FakeLoad(input_ago=20.0)
    rules = PauseRules(Preferences(), load, clock)
    assert rules.evaluate() == (False, "")                       # CPU work runs (at nice 19) beside the owner
    gpu = rules.evaluate_gpu()
    assert gpu.paused and gpu.reason.startswith("GPU work waits: the owner is at the machine (input 20 s ago")
    load.input_ago = 5 * 60.0
    assert not rules.evaluate_gpu().paused                       # idle long enough: the GPU is lent again
    allowed = PauseRules(Preferences(gpu_while_in_use=True), FakeLoad(input_ago=1.0), clock)
    assert not allowed.evaluate_gpu().paused


def test_a_server_without_a_graphical_session_lends_its_gpu_at_once_whatever_its_cpu_load() -> None:
    rules = PauseRules(Preferences(), FakeLoad(cpu=95.0, input_ago=None), FakeClock())
    assert rules.evaluate_gpu() == (False, "")


# -- how long a pause is expected to last -------------------------------------------------------------
def test_a_time_window_pause_is_expected_to_last_until_the_window_opens() -> None:
    clock, load = FakeClock(), FakeLoad()           # Monday 12:00
    rules = PauseRules(Preferences(time_windows=(Preferences.from_mapping(
        {"time_windows": "weekdays 19:00-08:00"}).time_windows)), load, clock)
    assert rules.evaluate().paused
    assert rules.expected_s == 7 * 3600
    clock.current = MONDAY.replace(hour=18, minute=55, second=30)
    rules.evaluate()
    assert rules.expected_s == 4 * 60 + 30


def test_expected_durations_of_manual_battery_and_cap_pauses() -> None:
    clock, load = FakeClock(), FakeLoad(battery=True)
    rules = PauseRules(Preferences(), load, clock)
    rules.pause(120)
    rules.evaluate()
    assert rules.expected_s == 120
    rules.pause(None)
    rules.evaluate()
    assert rules.expected_s is None        # until resumed: handed back only once it has lasted
    rules.resume()
    rules.evaluate()
    assert rules.expected_s == float("inf")   # battery
    capped = PauseRules(Preferences(daily_cap_hours=1), FakeLoad(), clock)
    capped.record_compute(3600)
    assert capped.evaluate().paused and capped.expected_s == 12 * 3600   # until midnight


# -- per-GPU selection -------------------------------------------------------------------------------
GPUS = [{"index": 0, "device": "cuda:0", "uuid": UUID0, "name": "A", "backend": "cuda", "vram_gb": 8},
        {"index": 1, "device": "cuda:1", "uuid": UUID1, "name": "B", "backend": "cuda", "vram_gb": 8}]


def test_devices_lend_only_allowed_gpus_less_excluded_and_paused_ones() -> None:
    allowed: Any = None
    excluded: Any = ()
    paused: dict[str, str] = {}
    devices = Devices(lambda: GPUS, lambda: allowed, lambda: excluded, lambda: paused)
    assert devices.lent() == ["cuda:0", "cuda:1"]
    excluded = (UUID0,)
    assert devices.lent() == ["cuda:1"]
    allowed, excluded = (0,), ()
    assert devices.lent() == ["cuda:0"]
    allowed = (UUID1, 0)
    paused = {"cuda:0": "game"}
    assert devices.take(Requirements()) == "cuda:1"   # the paused GPU gets no new task
    assert devices.take(Requirements()) == "cpu"


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    home = AgentHome(tmp_path / "home")
    home.ensure()
    (home.root / "prefs.yaml").write_text("pause_on_battery: false\n")
    return Daemon(home, [], DaemonSettings(drain_s=0), allow_no_board=True)


async def test_boards_are_told_only_of_lent_gpus_and_never_their_uuids(daemon: Daemon) -> None:
    daemon.capabilities = {**daemon.capabilities, "gpus": GPUS}
    assert [g.index for g in daemon.registration().capabilities.gpus] == [0, 1]
    set_preference(daemon.prefs.path, "exclude_gpus", f"GPU-{UUID1}")
    daemon.prefs.reload_if_changed()
    reg = daemon.registration()
    assert [g.index for g in reg.capabilities.gpus] == [0]
    assert "uuid" not in str(reg.capabilities.raw)


# -- the real daemon: hand back on a long pause, keep on a short one, no compute while paused ----------
async def _lessee(hub: InProcessHub) -> str | None:
    """Who holds the one task's lease on the board now (None: nobody, it waits in the queue)."""
    assert hub.server is not None
    view = hub.server.board.view
    [task] = [t for job in view.active_jobs() for t in await view.tasks(job.id)]
    return task.agent_id if task.state.value == "leased" and task.lease_id else None


def _window_elsewhere() -> str:
    """A window that is closed now and opens in more than a day."""
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now().weekday() + 3) % 7]
    return f"{day} 00:00-01:00"


async def test_paused_time_is_never_counted_as_compute(busy: Daemon) -> None:
    await busy.volunteer_tick(0.0)
    await busy.volunteer_tick(60.0)                    # a minute of work
    assert busy.rules.compute_today_s == 60.0
    busy.pause(300, "a short break")                   # short: the task is kept, stopped
    await busy.volunteer_tick(1.0)
    await busy.volunteer_tick(600.0)                   # ten paused minutes
    assert busy.rules.compute_today_s == 61.0          # the tick that saw it stop counts; the pause does not
    assert busy.status()["tasks"] and busy.pause_control.plan.stopped and not busy.pause_control.plan.hand_back
    busy.resume()
    await busy.volunteer_tick(1.0)                     # the tick that sees it run again: stopped until then
    await busy.volunteer_tick(30.0)
    assert busy.rules.compute_today_s == 91.0


async def test_a_short_pause_keeps_the_lease_and_a_time_window_hands_the_task_back(busy: Daemon,
                                                                                   hub: InProcessHub) -> None:
    me = busy.identity.id
    busy.pause(120, "two minutes")
    await busy.volunteer_tick(1.0)
    assert busy.pause_control.plan.stopped and not busy.pause_control.plan.hand_back and await _lessee(hub) == me
    busy.resume()
    set_preference(busy.prefs.path, "time_windows", _window_elsewhere())
    await busy.volunteer_tick(1.0)
    assert busy.paused_reason and busy.paused_reason.startswith("outside the allowed hours")
    await wait_for_async(lambda: not busy.status()["tasks"], "the task to be handed back and stopped here")
    assert await _lessee(hub) is None                  # back in the queue, for another agent
    assert busy.rules.compute_today_s == 0.0


async def test_workers_run_at_the_lowest_cpu_priority(busy: Daemon) -> None:
    """CPU work may go on beside the owner (``idle_only`` is off by default) because it takes only
    the cycles nobody else wants."""
    await busy.volunteer_tick(0.0)
    pids = [w.proc.pid for w in busy.pool.workers if w.proc is not None]
    assert pids and all(os.getpriority(os.PRIO_PROCESS, pid) == 19 for pid in pids)


class InjectedGpuSource:
    """Stands in for NVML (no GPU here): fixed readings; remembers which pids the agent called its own."""

    def __init__(self) -> None:
        self.readings: list[GpuReading] = []
        self.own: set[int] = set()

    def read(self, own_pids: Collection[int]) -> list[GpuReading]:
        self.own = set(own_pids)
        return list(self.readings)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_program_busy_on_one_gpu_pauses_gpu_work_there_and_a_long_one_withdraws_that_gpu(
        daemon: Daemon) -> None:
    daemon.capabilities = {**daemon.capabilities, "gpus": GPUS}
    set_preference(daemon.prefs.path, "gpu_while_in_use", "true")   # this machine's own load must not pause the GPU
    daemon.prefs.reload_if_changed()
    source, clock = InjectedGpuSource(), Ticks()
    daemon.pause_control.gpu_source, daemon.pause_control.gpu_tracker = source, PauseTracker(clock)
    # NVML numbers the GPUs the other way round from torch: its GPU 0 is torch's cuda:1 (by UUID).
    source.readings = [GpuReading(0, UUID1, 8 * 2**30, 0, 90.0, ("game",)), GpuReading(1, UUID0, 8 * 2**30, 0, 0.0)]
    await daemon.volunteer_tick(0.0)
    paused = daemon.pause_control.gpu_paused
    assert list(paused) == ["cuda:1"] and "game" in paused["cuda:1"]
    assert daemon.status()["gpu_paused"] == paused and not daemon.status()["paused"]   # CPU work goes on
    assert os.getpid() in source.own
    assert daemon.devices.take(Requirements()) == "cuda:0"
    assert [g.index for g in daemon.registration().capabilities.gpus] == [0, 1]   # a short pause: still lent
    clock.now = 600.0
    await daemon.volunteer_tick(1.0)
    assert [g.index for g in daemon.registration().capabilities.gpus] == [0]      # a game session: withdrawn
    source.readings = [GpuReading(0, UUID1, 8 * 2**30, 0, 3.0), GpuReading(1, UUID0, 8 * 2**30, 0, 0.0)]
    await daemon.volunteer_tick(1.0)
    assert daemon.pause_control.gpu_paused == {}
    assert [g.index for g in daemon.registration().capabilities.gpus] == [0, 1]


async def test_a_manual_pause_for_the_evening_hands_the_task_back_at_once(busy: Daemon, hub: InProcessHub) -> None:
    busy.pause(2 * 3600, "out for the evening")         # longer than handback_minutes (10)
    await busy.volunteer_tick(1.0)
    assert busy.pause_control.plan.hand_back
    await wait_for_async(lambda: not busy.status()["tasks"], "the task to be handed back and stopped here")
    assert await _lessee(hub) is None


async def test_a_worker_killed_while_stopped_is_stopped_again_by_the_next_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-back kills the stopped worker; the next worker process must not inherit "already stopped"."""
    import psutil

    monkeypatch.setenv("PANAL_WORKER_PRELOAD", "0")
    worker = Worker()
    await worker.start()
    try:
        worker.suspend()
        await worker.kill()
        await worker.start()
        worker.suspend()
        assert worker.proc is not None
        await wait_for_async(lambda: psutil.Process(worker.proc.pid).status() == psutil.STATUS_STOPPED,  # type: ignore[union-attr]
                             "the new worker to be stopped")
    finally:
        await worker.kill()
