"""Which device a task runs on: one task per lent GPU at a time, the CPU for everything else.

The volunteer chooses which GPUs are lent (``gpus``: all, none, or a list) and which never are
(``exclude_gpus``), by index or by UUID (an index can change when a card is added; a UUID cannot).
The same choice filters the GPUs the agent advertises, so a board sends no work meant for a GPU the
volunteer kept (:meth:`Devices.advertised`)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from jobs.requirements import Gpu, Requirements
from security.errors import BadRequest

__all__ = ["Devices", "matches"]


def matches(gpu: dict[str, Any], selectors: Collection[int | str]) -> bool:
    """Whether a capability report's GPU is named by one of ``selectors`` (indices, normalized UUIDs)."""
    uuid = str(gpu.get("uuid") or "").lower().removeprefix("gpu-")
    return any(s == gpu.get("index") if isinstance(s, int) else (bool(uuid) and s == uuid) for s in selectors)


class Devices:
    """The GPUs this agent lends: those the capability probe found (``gpus()``, read at each call,
    since the report is replaced once measured) that the owner allows (``allowed()``: selectors, or
    None for all) and does not exclude (``excluded()``), and that no pause holds now (``paused()``:
    devices whose GPU work stands aside)."""

    def __init__(self, gpus: Callable[[], list[dict[str, Any]]],
                 allowed: Callable[[], Collection[int | str] | None],
                 excluded: Callable[[], Collection[int | str]] = lambda: (),
                 paused: Callable[[], Collection[str]] = lambda: ()) -> None:
        self._gpus = gpus
        self._allowed = allowed
        self._excluded = excluded
        self._paused = paused
        self.busy: set[str] = set()

    def advertised(self) -> list[dict[str, Any]]:
        """The GPUs the volunteer lends (what the agent tells boards it has)."""
        allowed, excluded = self._allowed(), self._excluded()
        return [g for g in self._gpus() if (allowed is None or matches(g, allowed)) and not matches(g, excluded)]

    def lent(self) -> list[str]:
        """The devices (``cuda:0``...) this agent lends now."""
        return [str(g["device"]) for g in self.advertised() if g.get("device")]

    def take(self, requires: Requirements) -> str:
        """A free GPU that meets the task's clauses, else the CPU; a GPU-only task with every fitting GPU
        busy (or paused) gets :class:`BadRequest` ``no_free_gpu`` (worth a retry elsewhere)."""
        if requires.device == "cpu":
            return "cpu"
        gpus = {str(g.get("device")): g for g in self._gpus()}
        lent = self.lent()
        paused = set(self._paused())
        for device in lent:
            if device not in self.busy and device not in paused and requires.gpu_fits(Gpu.from_dict(gpus[device])):
                self.busy.add(device)
                return device
        if requires.device == "gpu" and lent:
            raise BadRequest("no free GPU meets this task's requirements right now", code="no_free_gpu")
        return "cpu"

    def give_back(self, device: str) -> None:
        self.busy.discard(device)
