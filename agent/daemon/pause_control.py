"""The volunteer's rules applied to the daemon's work, once a tick.

Each tick :meth:`PauseControl.decide` counts the compute of the interval just past (only if a task
ran, not stood still: paused time never counts, nor eats into the daily cap), asks the rules whether
all work pauses and for how long, reads other programs' GPU use, and makes the
:class:`~agent.daemon.pausing.Plan`; :meth:`PauseControl.apply` then stops and continues the task
workers and hands back the tasks of a long pause. Workers run at nice 19. A GPU paused past the
hand-back threshold is withdrawn from what boards are told, until it is free again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from agent.daemon.pausing import PauseTracker, Plan, gpu_pauses
from agent.volunteer.gpu_use import GpuReading, GpuSource, busy_gpus, own_descendants

if TYPE_CHECKING:
    from agent.daemon.board_link import BoardLink
    from agent.daemon.daemon import Daemon

__all__ = ["WORKER_NICE", "PauseControl"]

log = logging.getLogger(__name__)

#: workers' CPU priority: the lowest, so CPU work beside the owner takes only cycles nobody else wants
WORKER_NICE = 19


class PauseControl:
    """One daemon's pauses: what stands still now, what is handed back, which GPUs stand aside."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        #: other programs' GPU use (None: no NVML / rocm-smi here: GPU work never pauses for it)
        self.gpu_source: GpuSource | None = None
        self.gpu_paused: dict[str, str] = {}     # device -> why GPU work there stands aside
        self.gpu_withdrawn: set[str] = set()     # devices paused so long that boards are not told of them
        self.tracker = PauseTracker()            # since when each task stands still
        self.gpu_tracker = PauseTracker()        # since when each GPU stands aside
        self.plan = Plan()
        self._handing_back: set[str] = set()
        self._niced: set[int] = set()

    async def decide(self, elapsed_s: float) -> str | None:
        """Count the last ``elapsed_s`` of compute, decide this tick's plan; why all work pauses, or None."""
        d = self._daemon
        if self.plan.running:
            d.rules.record_compute(elapsed_s)
        paused, reason = d.rules.evaluate()
        self.gpu_paused = await self._gpu_pauses()
        handback_s = d.prefs.current.handback_minutes * 60
        withdrawn = set(self.gpu_tracker.plan({g: g for g in d.devices.lent()}, all_work=None, expected_s=0.0,
                                              gpu=self.gpu_paused, handback_s=handback_s).hand_back)
        if withdrawn != self.gpu_withdrawn:   # or its boards send GPU work straight back to us
            self.gpu_withdrawn = withdrawn
            d.readvertise()
        tasks = {tid: r.device for link in d.links for tid, r in link.running.items() if not r.lost}
        self.plan = self.tracker.plan(tasks, all_work=reason if paused else None, expected_s=d.rules.expected_s,
                                      gpu=self.gpu_paused, handback_s=handback_s)
        return reason if paused else None

    async def _gpu_pauses(self) -> dict[str, str]:
        d = self._daemon
        if not d.devices.lent():
            return {}
        owner = d.rules.evaluate_gpu()
        readings: list[GpuReading] = []
        if self.gpu_source is not None and not owner.paused:
            own = {os.getpid(), *own_descendants()}   # sandboxed workers too, under their outside pids
            readings = await asyncio.to_thread(self.gpu_source.read, own)
        busy = busy_gpus(readings, d.prefs.current)
        return gpu_pauses(d.devices.advertised(), readings, busy, owner.reason if owner.paused else None)

    def apply(self) -> None:
        """Stop the workers of stopped tasks, continue the others; start handing back the long-paused."""
        d = self._daemon
        self._lower_priority()
        for link in d.links:
            for tid, running in link.running.items():
                if running.worker is None:
                    continue
                if tid in self.plan.stopped:
                    running.worker.suspend()
                elif d.paused_reason is None:
                    running.worker.resume()
        for tid, why in self.plan.hand_back.items():
            holder = next((k for k in d.links if tid in k.running), None)
            if holder is None or tid in self._handing_back:
                continue
            self._handing_back.add(tid)
            log.info("handing task %s back to %s: %s (a long pause)", tid, holder.address.url, why)
            d.track(asyncio.get_running_loop().create_task(self._hand_back(holder, tid)))

    async def _hand_back(self, link: BoardLink, task_id: str) -> None:
        try:
            await link.hand_back(task_id)
        finally:
            self._handing_back.discard(task_id)

    def task_workers(self) -> list[Any]:
        """Every worker process of the daemon: the warm pool's, and the sandboxes running tasks."""
        d = self._daemon
        running = [r.worker for link in d.links for r in link.running.values() if r.worker is not None]
        return [*d.pool.workers, *(w for w in running if w not in d.pool.workers)]

    def resume_workers(self) -> None:
        """Continue every worker but those a GPU pause still holds (an all-work pause ended)."""
        held = {id(r.worker) for link in self._daemon.links for tid, r in link.running.items()
                if tid in self.plan.stopped and r.device in self.gpu_paused}
        for worker in self.task_workers():
            if id(worker) not in held:
                worker.resume()

    def _lower_priority(self) -> None:
        """Every worker (its whole process group) at :data:`WORKER_NICE`, once per worker process.

        Not done: where the kernel's autogroups are on (``/proc/sys/kernel/sched_autogroup_enabled``,
        most desktops), a worker's new session is its own group and nice ranks it only among its own
        processes; lowering the group too (``/proc/PID/autogroup``) would make it yield to the owner's
        programs, and is the next step (it starves test agents on a loaded CI machine, so it wants a
        setting first)."""
        live = {w.proc.pid for w in self.task_workers() if w.proc is not None and w.proc.returncode is None}
        for pid in live - self._niced:
            try:
                os.setpriority(os.PRIO_PGRP, pid, WORKER_NICE)   # a worker leads its own session and group
            except OSError as exc:
                log.debug("cannot lower the priority of worker %d: %s", pid, exc)
        self._niced = live
