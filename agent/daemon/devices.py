"""Which device a task runs on: one task per lent GPU at a time, the CPU for everything else."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from jobs.requirements import Gpu, Requirements
from security.errors import BadRequest

__all__ = ["Devices"]


class Devices:
    """The GPUs this agent lends: those the capability probe found (``gpus()``, read at each call,
    since the report is replaced once measured) and the owner allows (``allowed()``: GPU indices, or
    None for all)."""

    def __init__(self, gpus: Callable[[], list[dict[str, Any]]],
                 allowed: Callable[[], Collection[int] | None]) -> None:
        self._gpus = gpus
        self._allowed = allowed
        self.busy: set[str] = set()

    def lent(self) -> list[str]:
        """The devices (``cuda:0``...) this agent lends now."""
        allowed = self._allowed()
        return [str(g["device"]) for g in self._gpus()
                if g.get("device") and (allowed is None or int(g.get("index", -1)) in allowed)]

    def take(self, requires: Requirements) -> str:
        """A free GPU that meets the task's clauses, else the CPU; a GPU-only task with every fitting GPU
        busy gets :class:`BadRequest` ``no_free_gpu`` (worth a retry elsewhere)."""
        if requires.device == "cpu":
            return "cpu"
        gpus = {str(g.get("device")): g for g in self._gpus()}
        lent = self.lent()
        for device in lent:
            if device not in self.busy and requires.gpu_fits(Gpu.from_dict(gpus[device])):
                self.busy.add(device)
                return device
        if requires.device == "gpu" and lent:
            raise BadRequest("no free GPU meets this task's requirements right now", code="no_free_gpu")
        return "cpu"

    def give_back(self, device: str) -> None:
        self.busy.discard(device)
