"""Who else is using this machine's GPUs, and whether GPU work must stand aside for them.

A game or a render on the volunteer's GPU gets no help from the OS scheduler: a GPU has no
priorities, so a task beside it takes its frames (and a stopped task keeps its memory). The agent
therefore reads, per GPU, how busy *other* programs keep it and how much of its memory they hold,
and pauses GPU work on a GPU where either is over the volunteer's threshold.

Readings come from a :class:`GpuSource`: NVML (``nvidia-ml-py``, the optional ``gpu`` extra) on
NVIDIA, ``rocm-smi --json`` on AMD, nothing otherwise (no reading: no GPU pause). The decision,
:func:`busy_gpus`, is a pure function of readings and preferences, so it is tested with injected
readings; the sources are thin adapters (NVML is exercised by ``make gpu-check`` on a GPU machine).

The agent's own processes never count: a reading excludes the pids it is given (the daemon and its
workers). A process the agent cannot see in its own ``/proc`` (another container, another PID
namespace: NVML reports host pids) is not counted either, since it might be the agent's own worker
under another number and the agent would pause itself for ever.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent.volunteer.preferences import Preferences

__all__ = ["GpuReading", "GpuSource", "NvmlSource", "RocmSmiSource", "busy_gpus", "detect_gpu_source",
           "normalize_uuid", "own_descendants"]

log = logging.getLogger(__name__)

ROCM_SMI_TIMEOUT_S = 3.0
#: rocm-smi is a Python program (a few hundred ms of CPU a run): read at most this often, not every tick
ROCM_SMI_EVERY_S = 10.0


@dataclass(frozen=True)
class GpuReading:
    """One GPU as other programs use it now. ``None``: the source cannot tell."""

    index: int                       # the source's index (NVML / rocm-smi order)
    uuid: str | None                 # normalized (:func:`normalize_uuid`); how a reading finds its torch device
    memory_total: int                # bytes
    other_memory: int | None         # bytes held by other programs
    other_percent: float | None      # busy percentage due to other programs
    others: tuple[str, ...] = ()     # their names, for the pause reason


class GpuSource(Protocol):
    def read(self, own_pids: Collection[int]) -> list[GpuReading]:
        """Every GPU's reading, the agent's ``own_pids`` excluded; [] when reading failed."""
        ...


def normalize_uuid(text: str | None) -> str | None:
    """``GPU-8C3E...`` (NVML, nvidia-smi) and ``8c3e...`` (torch) name one GPU: lower case, no prefix."""
    if not text:
        return None
    return text.strip().lower().removeprefix("gpu-")


def busy_gpus(readings: Iterable[GpuReading], prefs: Preferences) -> dict[int, str]:
    """GPU index (the reading's) -> why GPU work there pauses, for each GPU another program uses above
    the volunteer's thresholds (``gpu_pause_percent``, ``gpu_pause_memory_fraction``)."""
    busy: dict[int, str] = {}
    for r in readings:
        who = f" ({', '.join(r.others[:3])})" if r.others else ""
        if r.other_percent is not None and r.other_percent > prefs.gpu_pause_percent:
            busy[r.index] = (f"another program{who} uses GPU {r.index} at {r.other_percent:.0f}% "
                             f"(> {prefs.gpu_pause_percent:g}%)")
        elif r.other_memory is not None and r.memory_total > 0 \
                and r.other_memory / r.memory_total > prefs.gpu_pause_memory_fraction:
            busy[r.index] = (f"another program{who} holds {r.other_memory / r.memory_total:.0%} of GPU "
                             f"{r.index}'s memory (> {prefs.gpu_pause_memory_fraction:.0%})")
    return busy


def _visible(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8", errors="replace").strip() or str(pid)
    except OSError:
        return str(pid)


class NvmlSource:
    """NVIDIA GPUs through NVML. Memory: the sum over other visible processes (compute and graphics);
    use: the per-process utilization samples since the last reading, or, where the driver gives none,
    the whole GPU's use while none of the agent's processes is on it."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._last_seen: dict[int, int] = {}

    @classmethod
    def open(cls) -> NvmlSource | None:
        """NVML initialized, or None (no ``nvidia-ml-py``, no driver, no NVIDIA GPU)."""
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            if nvml.nvmlDeviceGetCount() == 0:
                return None
        except nvml.NVMLError as exc:
            log.debug("NVML unavailable: %s", exc)
            return None
        return cls(nvml)

    def read(self, own_pids: Collection[int]) -> list[GpuReading]:
        nvml = self._nvml
        readings = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.warning("cannot read GPU use through NVML: %s", exc)
            return []
        for i in range(count):
            try:
                readings.append(self._read_one(i, own_pids))
            except nvml.NVMLError as exc:
                log.warning("cannot read GPU %d through NVML: %s", i, exc)
        return readings

    def _read_one(self, index: int, own_pids: Collection[int]) -> GpuReading:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        procs = [*nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                 *nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)]
        mine_here = any(p.pid in own_pids for p in procs)
        memory: dict[int, int] = {}
        for p in procs:
            if p.pid not in own_pids and _visible(p.pid) and p.usedGpuMemory is not None:
                memory[p.pid] = max(memory.get(p.pid, 0), int(p.usedGpuMemory))
        percent: float | None = None
        users: dict[int, float] = {}
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, self._last_seen.get(index, 0))
            for s in samples:
                self._last_seen[index] = max(self._last_seen.get(index, 0), int(s.timeStamp))
                if s.pid not in own_pids and _visible(s.pid):
                    users[s.pid] = max(users.get(s.pid, 0.0), float(s.smUtil))
            percent = max(users.values(), default=0.0)
        except nvml.NVMLError:   # NotFound: no sample since last time; NotSupported: older GPUs
            if not mine_here:
                percent = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        names = tuple(sorted({_name(pid) for pid in (*memory, *(p for p, u in users.items() if u > 0))}))
        return GpuReading(index, normalize_uuid(uuid), total, sum(memory.values()), percent, names)


class RocmSmiSource:
    """AMD GPUs through ``rocm-smi --json``: the whole GPU's use and VRAM, less the agent's own
    processes' VRAM (``--showpids`` lists them where it can). The use of a GPU the agent itself runs
    on cannot be split by process, so it is not read (memory still is)."""

    def __init__(self, rocm_smi: str) -> None:
        self._argv = [rocm_smi, "--showuse", "--showmeminfo", "vram", "--showuniqueid", "--showpids", "--json"]
        self._last: tuple[float, list[GpuReading]] | None = None

    @classmethod
    def open(cls) -> RocmSmiSource | None:
        path = shutil.which("rocm-smi")
        return cls(path) if path else None

    def read(self, own_pids: Collection[int]) -> list[GpuReading]:
        if self._last is not None and time.monotonic() - self._last[0] < ROCM_SMI_EVERY_S:
            return self._last[1]
        readings = self._run(own_pids)
        self._last = (time.monotonic(), readings)
        return readings

    def _run(self, own_pids: Collection[int]) -> list[GpuReading]:
        try:
            done = subprocess.run(self._argv, capture_output=True, text=True, timeout=ROCM_SMI_TIMEOUT_S, check=False)
            data = json.loads(done.stdout)
        except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            log.warning("cannot read GPU use through rocm-smi: %s", exc)
            return []
        return parse_rocm_smi(data, own_pids) if isinstance(data, dict) else []


def parse_rocm_smi(data: dict[str, Any], own_pids: Collection[int]) -> list[GpuReading]:
    """Readings from ``rocm-smi --json`` output: ``card0: {"GPU use (%)": "3", "VRAM Total Memory (B)": ...}``
    and, with ``--showpids``, ``system: {"PID123": "name, gpus, vram bytes, ..."}``."""
    own_vram = 0
    own_on_gpu = False
    for key, value in (data.get("system") or {}).items():
        if not key.startswith("PID") or not isinstance(value, str):
            continue
        try:
            pid = int(key[3:])
            fields = [f.strip() for f in value.split(",")]
            if pid in own_pids:
                own_on_gpu = True
                own_vram += int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
        except ValueError:
            continue
    readings = []
    for key, card in sorted(data.items()):
        if not key.startswith("card") or not isinstance(card, dict) or not key[4:].isdigit():
            continue
        try:
            total = int(card.get("VRAM Total Memory (B)", 0))
            used = int(card.get("VRAM Total Used Memory (B)", 0))
            use = card.get("GPU use (%)")
            percent = None if own_on_gpu or use is None else float(use)
        except (TypeError, ValueError):
            continue
        uuid = card.get("Unique ID")
        # One card, or several with the agent's VRAM unattributed: count it off every card (err towards running).
        readings.append(GpuReading(int(key[4:]), normalize_uuid(str(uuid)) if uuid else None, total,
                                   max(0, used - own_vram), percent))
    return readings


def own_descendants() -> set[int]:
    """Pids of every process this one started, at any depth (warm workers, sandboxes and what runs in them)."""
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def detect_gpu_source() -> GpuSource | None:
    """NVML where it works, else rocm-smi where installed, else None (GPU use is not watched)."""
    return NvmlSource.open() or RocmSmiSource.open()
