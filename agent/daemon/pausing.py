"""Which running tasks stand still, why, and which are handed back: the pause plan of each tick.

Two kinds of pause reach a task. An *all-work* pause (the volunteer's rules: manual, battery, time
windows, the daily cap, an exclusive app, the owner at the machine with ``idle_only``) stops every
task; a *GPU* pause (another program busy on that GPU, or the owner at the machine without
``gpu_while_in_use``) stops only the tasks on that GPU, and CPU work goes on.

A stopped task keeps its lease (its heartbeats go on) as long as the pause is short. A pause that
is expected to outlast ``handback_minutes`` (a time window that opens in hours, a manual pause for
the evening, battery) or that has already lasted that long (a game session) hands the task back with
its latest checkpoint, so another agent continues it instead of the task waiting for this machine:
``weekdays 19:00-08:00`` must not hold a task hostage for eleven hours. A stopped task never counts
as compute (:attr:`Plan.running`).

:class:`PauseTracker` is pure (a clock is injected); the daemon applies its plan to the workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.volunteer.gpu_use import GpuReading, normalize_uuid

__all__ = ["PauseTracker", "Plan", "gpu_pauses"]


@dataclass
class Plan:
    """One tick's verdict over the running tasks (task id -> reason)."""

    stopped: dict[str, str] = field(default_factory=dict)     # stand still now
    hand_back: dict[str, str] = field(default_factory=dict)   # give back to the board (a subset of stopped)
    running: int = 0                                          # tasks that compute now


class PauseTracker:
    """Remembers since when each task stands still, to tell a short pause from a long one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[str, float] = {}

    def plan(self, tasks: Mapping[str, str], *, all_work: str | None, expected_s: float | None,
             gpu: Mapping[str, str], handback_s: float) -> Plan:
        """``tasks``: task id -> the device it runs on (``cpu``, ``cuda:0``...). ``all_work``: why all
        work pauses (None: it may run), expected to last ``expected_s`` (None: nobody can tell).
        ``gpu``: device -> why GPU work there pauses. A task stopped for ``handback_s`` or more, or by an
        all-work pause expected to last that long, is to be handed back."""
        now = self._clock()
        plan = Plan()
        for task_id, device in tasks.items():
            reason = all_work if all_work is not None else (gpu.get(device) if device != "cpu" else None)
            if reason is None:
                self._since.pop(task_id, None)
                plan.running += 1
                continue
            since = self._since.setdefault(task_id, now)
            plan.stopped[task_id] = reason
            expected_long = all_work is not None and expected_s is not None and expected_s >= handback_s
            if expected_long or now - since >= handback_s:
                plan.hand_back[task_id] = reason
        for gone in set(self._since) - set(tasks):
            del self._since[gone]
        return plan


def gpu_pauses(gpus: Iterable[Mapping[str, Any]], readings: Iterable[GpuReading], busy: Mapping[int, str],
               owner: str | None) -> dict[str, str]:
    """Device (``cuda:0``...) -> why GPU work there pauses. ``gpus``: the capability report's GPUs;
    ``busy``: reading index -> reason (:func:`agent.volunteer.gpu_use.busy_gpus`); ``owner``: why every
    GPU pauses (the owner is at the machine), or None. A reading finds its device by UUID where both
    have one (NVML and torch may number GPUs differently), else by index."""
    by_uuid = {r.uuid: r.index for r in readings if r.uuid}
    out: dict[str, str] = {}
    for gpu in gpus:
        device = gpu.get("device")
        if not device:
            continue
        if owner is not None:
            out[str(device)] = owner
            continue
        uuid = normalize_uuid(str(gpu["uuid"])) if gpu.get("uuid") else None
        index = by_uuid.get(uuid) if uuid in by_uuid else gpu.get("index")
        if isinstance(index, int) and index in busy:
            out[str(device)] = busy[index]
    return out
