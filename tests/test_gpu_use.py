"""GPU-aware pausing: the decision from injected GPU readings, the NVML and rocm-smi adapters over
their raw answers, the device mapping, and the pause plan (short pauses keep tasks, long ones hand
them back). No GPU here: only the reading source is injected, never the decision."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.daemon.pausing import PauseTracker, gpu_pauses
from agent.volunteer.gpu_use import (
    GpuReading,
    NvmlSource,
    RocmSmiSource,
    busy_gpus,
    normalize_uuid,
    parse_rocm_smi,
)
from agent.volunteer.preferences import Preferences

GIB = 2**30
UUID0 = "8c3e1a52-1111-2222-3333-444455556666"
UUID1 = "9d4f2b63-aaaa-bbbb-cccc-ddddeeeeffff"


def reading(index: int = 0, *, memory: int | None = 0, percent: float | None = 0.0, total: int = 8 * GIB,
            uuid: str | None = None, others: tuple[str, ...] = ()) -> GpuReading:
    return GpuReading(index, uuid, total, memory, percent, others)


# -- the decision ------------------------------------------------------------------------------------
def test_another_program_busy_on_a_gpu_pauses_gpu_work_there_only() -> None:
    prefs = Preferences()   # defaults: 20 % use, 25 % of memory
    busy = busy_gpus([reading(0, percent=85.0, others=("game.exe",)), reading(1, percent=5.0)], prefs)
    assert list(busy) == [0]
    assert "game.exe" in busy[0] and "85%" in busy[0]


def test_another_program_holding_a_share_of_gpu_memory_pauses_gpu_work() -> None:
    prefs = Preferences(gpu_pause_memory_fraction=0.25)
    assert busy_gpus([reading(memory=3 * GIB)], prefs).keys() == {0}          # 37 % of 8 GiB
    assert busy_gpus([reading(memory=GIB // 2)], prefs) == {}                 # a compositor's 6 %


def test_unknown_readings_and_quiet_gpus_never_pause() -> None:
    prefs = Preferences()
    assert busy_gpus([reading(memory=None, percent=None), reading(1, memory=0, percent=19.0)], prefs) == {}
    assert busy_gpus([], prefs) == {}


def test_thresholds_follow_the_volunteers_preferences() -> None:
    hot = [reading(percent=50.0)]
    assert busy_gpus(hot, Preferences(gpu_pause_percent=60.0)) == {}
    assert busy_gpus(hot, Preferences(gpu_pause_percent=40.0)).keys() == {0}


# -- NVML: the adapter over the bindings' answers (the bindings are what is injected) ---------------
class NVMLError(Exception):
    pass


@dataclass
class FakeNvml:
    """pynvml's calls this adapter makes, answering from fixed data (a driver's answers)."""

    procs: list[tuple[int, int | None]]                   # (pid, usedGpuMemory)
    samples: list[tuple[int, int]] | None                 # (pid, smUtil), None: NotSupported
    device_util: int = 0
    NVMLError: type[Exception] = NVMLError
    seen: list[int] = field(default_factory=list)

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return b"GPU-" + UUID0.upper().encode()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=8 * GIB, used=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[Any]:
        return []

    def nvmlDeviceGetProcessUtilization(self, h: int, since: int) -> list[Any]:
        self.seen.append(since)
        if self.samples is None:
            raise NVMLError("Not Supported")
        return [SimpleNamespace(pid=p, smUtil=u, timeStamp=1000 + i) for i, (p, u) in enumerate(self.samples)]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self.device_util)


@pytest.fixture
def other() -> Any:
    """A real process of someone else on this machine (visible in /proc), standing in for a game."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_nvml_reading_counts_other_programs_and_never_the_agents_own(other: Any) -> None:
    mine = os.getpid()
    nvml = FakeNvml(procs=[(mine, 6 * GIB), (other.pid, 3 * GIB)], samples=[(mine, 99), (other.pid, 40)])
    [r] = NvmlSource(nvml).read({mine})
    assert (r.uuid, r.other_memory, r.other_percent) == (UUID0, 3 * GIB, 40.0)
    assert busy_gpus([r], Preferences()).keys() == {0}
    # The agent alone on the GPU, at full use: nothing pauses it.
    [alone] = NvmlSource(FakeNvml(procs=[(mine, 6 * GIB)], samples=[(mine, 99)])).read({mine})
    assert (alone.other_memory, alone.other_percent) == (0, 0.0)
    assert busy_gpus([alone], Preferences()) == {}


def test_nvml_ignores_pids_outside_this_pid_namespace(other: Any) -> None:
    """NVML reports host pids; in a container the agent's own worker shows under a number it cannot see.
    Counting it would pause the agent for its own work, for ever."""
    unseen = 2**22 + 17   # above pid_max's default: no such process here
    [r] = NvmlSource(FakeNvml(procs=[(unseen, 7 * GIB)], samples=[(unseen, 100)])).read({os.getpid()})
    assert (r.other_memory, r.other_percent) == (0, 0.0)


def test_nvml_without_per_process_samples_uses_the_gpu_only_when_the_agent_is_not_on_it(other: Any) -> None:
    mine = os.getpid()
    [idle_agent] = NvmlSource(FakeNvml(procs=[], samples=None, device_util=70)).read({mine})
    assert idle_agent.other_percent == 70.0       # nobody of ours there: the whole GPU's use is others'
    [working] = NvmlSource(FakeNvml(procs=[(mine, GIB)], samples=None, device_util=70)).read({mine})
    assert working.other_percent is None          # ours and theirs cannot be told apart: not counted


def test_nvml_asks_only_for_samples_newer_than_the_last_reading() -> None:
    nvml = FakeNvml(procs=[], samples=[(1, 0), (1, 0)])
    source = NvmlSource(nvml)
    source.read(set())
    source.read(set())
    assert nvml.seen == [0, 1001]


def test_nvml_is_absent_here_and_that_means_no_gpu_source() -> None:
    assert NvmlSource.open() is None   # no NVIDIA driver on this machine (the GPU path runs in make gpu-check)


# -- rocm-smi -----------------------------------------------------------------------------------------
def test_rocm_smi_json_gives_use_and_memory_less_the_agents_own() -> None:
    data = {"card0": {"GPU use (%)": "64", "VRAM Total Memory (B)": str(16 * GIB),
                      "VRAM Total Used Memory (B)": str(6 * GIB), "Unique ID": "0x1234abcd"},
            "card1": {"GPU use (%)": "0", "VRAM Total Memory (B)": str(16 * GIB),
                      "VRAM Total Used Memory (B)": str(GIB // 4)},
            "system": {"PID4242": f"python, 1, {2 * GIB}, 0, unknown", "PID77": f"game, 1, {3 * GIB}, 0, unknown"}}
    r0, r1 = parse_rocm_smi(data, own_pids={4242})
    assert (r0.index, r0.other_memory, r0.other_percent, r0.uuid) == (0, 4 * GIB, None, "0x1234abcd")
    assert r1.other_memory == 0
    assert parse_rocm_smi(data, own_pids=set())[0].other_percent == 64.0
    assert parse_rocm_smi({"card0": {"GPU use (%)": "N/A"}}, own_pids=set()) == []


# -- from readings to devices, and the plan ------------------------------------------------------------
def test_a_reading_finds_its_device_by_uuid_when_nvml_and_torch_number_gpus_differently() -> None:
    gpus = [{"index": 0, "device": "cuda:0", "uuid": UUID1}, {"index": 1, "device": "cuda:1", "uuid": UUID0}]
    readings = [reading(0, uuid=UUID0), reading(1, uuid=UUID1)]
    assert gpu_pauses(gpus, readings, {0: "game on NVML 0"}, None) == {"cuda:1": "game on NVML 0"}
    no_uuids = [{"index": 0, "device": "cuda:0"}, {"index": 1, "device": "cuda:1"}]
    assert gpu_pauses(no_uuids, [reading(0), reading(1)], {0: "busy"}, None) == {"cuda:0": "busy"}
    assert gpu_pauses(gpus, readings, {}, "owner at the machine") == {"cuda:0": "owner at the machine",
                                                                       "cuda:1": "owner at the machine"}
    assert normalize_uuid("GPU-" + UUID0.upper()) == UUID0


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_gpu_pause_stops_only_gpu_tasks_and_hands_them_back_once_it_lasts() -> None:
    clock = Ticks()
    tracker = PauseTracker(clock)
    tasks = {"cpu-task": "cpu", "gpu-task": "cuda:0", "other-gpu": "cuda:1"}
    plan = tracker.plan(tasks, all_work=None, expected_s=0.0, gpu={"cuda:0": "game"}, handback_s=600)
    assert plan.stopped == {"gpu-task": "game"} and plan.hand_back == {} and plan.running == 2
    clock.now = 599
    assert tracker.plan(tasks, all_work=None, expected_s=0.0, gpu={"cuda:0": "game"}, handback_s=600).hand_back == {}
    clock.now = 600
    plan = tracker.plan(tasks, all_work=None, expected_s=0.0, gpu={"cuda:0": "game"}, handback_s=600)
    assert plan.hand_back == {"gpu-task": "game"}


def test_a_short_pause_keeps_tasks_and_a_long_one_hands_them_back_at_once() -> None:
    clock = Ticks()
    tracker = PauseTracker(clock)
    tasks = {"t": "cpu"}
    short = tracker.plan(tasks, all_work="paused 5 min", expected_s=300, gpu={}, handback_s=600)
    assert short.stopped == {"t": "paused 5 min"} and short.hand_back == {} and short.running == 0
    assert tracker.plan(tasks, all_work=None, expected_s=0.0, gpu={}, handback_s=600).running == 1
    window = tracker.plan(tasks, all_work="outside the allowed hours", expected_s=11 * 3600, gpu={}, handback_s=600)
    assert window.hand_back == {"t": "outside the allowed hours"}
    # Nobody can tell how long (the owner at the machine): handed back once it has lasted the threshold.
    fresh = PauseTracker(clock)
    assert fresh.plan(tasks, all_work="owner active", expected_s=None, gpu={}, handback_s=600).hand_back == {}
    clock.now += 600
    assert fresh.plan(tasks, all_work="owner active", expected_s=None, gpu={}, handback_s=600).hand_back == {
        "t": "owner active"}


def test_rocm_smi_runs_as_a_program_and_at_most_every_few_seconds(tmp_path: Path) -> None:
    """An executable standing in for rocm-smi (there is no AMD GPU here) prints what rocm-smi prints."""
    runs = tmp_path / "runs"
    tool = tmp_path / "rocm-smi"
    tool.write_text(f"#!/bin/sh\necho x >> {runs}\n"
                    "echo '{\"card0\": {\"GPU use (%)\": \"91\", \"VRAM Total Memory (B)\": \"1000\","
                    " \"VRAM Total Used Memory (B)\": \"10\"}}'\n")
    tool.chmod(0o755)
    source = RocmSmiSource(str(tool))
    [r] = source.read(set())
    assert (r.other_percent, r.other_memory, r.memory_total) == (91.0, 10, 1000)
    assert busy_gpus([r], Preferences()).keys() == {0}
    assert source.read(set()) == [r] and runs.read_text().count("x") == 1   # the cached reading
