"""The sandboxes an agent keeps: one started ahead per placement (CPU, or GPU with the device nodes bound),
each used for one task and replaced as it is taken, and closed when no task comes for the idle period.

The start (bubblewrap, then torch's import: seconds) is paid off the task's path; the single use keeps
one submitter's code from ever seeing another's state (:mod:`agent.engine.sandboxed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from agent.engine.sandboxed import DISK_BYTES, SandboxedWorker
from security.errors import PanalError

__all__ = ["SandboxPool"]

log = logging.getLogger(__name__)


class SandboxPool:
    """One started sandbox ready per placement (CPU / GPU); each is used once and replaced once its
    task ends (a second task arriving while the first runs starts its own, paying the cold start)."""

    def __init__(self, base: Path, exclude: Iterable[Path] = (), disk_bytes: int = DISK_BYTES) -> None:
        self.base = base
        self.exclude = list(exclude)
        self.disk_bytes = disk_bytes
        self._ready: dict[bool, asyncio.Task[SandboxedWorker]] = {}
        self._ready_since: dict[bool, float] = {}
        self._running: set[SandboxedWorker] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def prewarm(self, gpu: bool = False) -> None:
        """Start a sandbox for the next task of this placement, if none is ready or starting."""
        if gpu not in self._ready:
            self._ready[gpu] = asyncio.ensure_future(self._start(gpu))
            self._ready_since[gpu] = time.monotonic()

    async def retire_idle(self, idle_s: float) -> int:
        """Close every sandbox started ahead that no task took for ``idle_s`` seconds (a volunteer's
        idle agent is its daemon alone, as for warm workers); the next task starts one cold."""
        now = time.monotonic()
        stale = [gpu for gpu, task in self._ready.items()
                 if task.done() and now - self._ready_since.get(gpu, now) >= idle_s]
        for gpu in stale:
            task = self._ready.pop(gpu)
            if not task.cancelled() and task.exception() is None:
                await task.result().close()
        return len(stale)

    async def ready(self, gpu: bool = False) -> None:
        """Wait until the sandbox started ahead for this placement is up (benchmarks, tests)."""
        task = self._ready.get(gpu)
        if task is not None:
            await asyncio.wait({task})

    async def _start(self, gpu: bool) -> SandboxedWorker:
        worker = SandboxedWorker(self.base, gpu=gpu, exclude=self.exclude, disk_bytes=self.disk_bytes)
        try:
            await worker.start()
        except BaseException:
            await worker.close()
            raise
        return worker

    async def _take(self, gpu: bool) -> SandboxedWorker:
        ready = self._ready.pop(gpu, None)
        if ready is not None:
            try:
                worker = await asyncio.shield(ready)   # a cancelled task leaves the sandbox starting
                if worker.alive:
                    return worker
                await worker.close()
            except asyncio.CancelledError:
                if self._ready.setdefault(gpu, ready) is not ready:   # back for the next task, or closed
                    self._reap(ready)
                raise
            except PanalError:
                raise
            except Exception as exc:   # the prestarted one failed: say so and start one now
                log.warning("a prestarted sandbox failed: %s", exc)
        return await self._start(gpu)

    def _reap(self, starting: asyncio.Task[SandboxedWorker]) -> None:
        async def reap() -> None:
            with contextlib.suppress(Exception):
                await (await starting).close()
        closing = asyncio.ensure_future(reap())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    @contextlib.asynccontextmanager
    async def worker(self, gpu: bool = False) -> AsyncIterator[SandboxedWorker]:
        """A started sandbox for one task; closed (and removed) afterwards, the next one starting."""
        worker = await self._take(gpu)
        self._running.add(worker)
        try:
            yield worker
        finally:
            self._running.discard(worker)
            closing = asyncio.ensure_future(worker.close())   # reaped off the task's path
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            self.prewarm(gpu)   # the next task's sandbox starts now, off this task's path

    def suspend_all(self) -> None:
        for worker in self._running:
            worker.suspend()

    def resume_all(self) -> None:
        for worker in self._running:
            worker.resume()

    async def close(self) -> None:
        ready = list(self._ready.values())
        self._ready.clear()
        # a starting sandbox is let finish, then closed: cancelling asyncio's process start midway
        # can leave it waiting forever for a child it has not yet watched
        for result in await asyncio.gather(*ready, return_exceptions=True):
            if isinstance(result, SandboxedWorker):
                await result.close()
        await asyncio.gather(*(w.close() for w in list(self._running)), *self._closing, return_exceptions=True)
