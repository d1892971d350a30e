"""Warm worker processes and the limits around them (time, memory, crash classification).

The daemon never runs task code itself. Each slot owns one :class:`Worker` child process; a task
that overruns its time limit is killed (``timeout``), one whose process dies is reported from the
way it died (``oom`` for a SIGKILL we did not send, ``crashed`` otherwise), and the slot gets a
fresh worker. Workers are started ahead of need so torch's import cost is paid once per slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.engine.frames import MAX_FRAME, pack_frame, read_frame
from agent.engine.memwatch import WATCH_S, MemoryWatch
from jobs.errors import FailureClass

__all__ = ["Outcome", "TaskRequest", "Worker", "WorkerPool"]

log = logging.getLogger(__name__)


@dataclass
class TaskRequest:
    kind: str
    params: Mapping[str, Any]
    timeout_s: float
    workdir: str
    device: str = "cpu"
    threads: int = 1
    max_memory_gb: float | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)
    gpu_memory_fraction: float | None = None

    def frame(self) -> dict[str, Any]:
        return {"op": "run", "kind": self.kind, "params": dict(self.params), "workdir": self.workdir,
                "device": self.device, "threads": self.threads, "max_memory_gb": self.max_memory_gb,
                "inputs": dict(self.inputs), "devices": list(self.devices),
                "gpu_memory_fraction": self.gpu_memory_fraction}


@dataclass
class Outcome:
    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    error_class: str | None = None
    error: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0

    @classmethod
    def failed(cls, failure: FailureClass, message: str, started: float) -> Outcome:
        return cls(False, error_class=failure.value, error=message, started_at=started, finished_at=time.time())

    @classmethod
    def from_reply(cls, reply: Mapping[str, Any]) -> Outcome:
        """The worker's ``done`` frame (TypeError/ValueError when it is not one: the task may forge it)."""
        if not isinstance(reply, Mapping) or not all(isinstance(k, str) for k in reply.get("files") or {}) or \
                not all(isinstance(v, str) for v in (reply.get("files") or {}).values()):
            raise TypeError("a reply is a map whose files are names and paths")
        error_class, error = reply.get("error_class"), reply.get("error")
        if not isinstance(error_class, str | None) or not isinstance(error, str | None):
            raise TypeError("a reply's error and error_class are text")
        return cls(bool(reply.get("ok")), dict(reply.get("values") or {}), dict(reply.get("metrics") or {}),
                   list(reply.get("notes") or []), dict(reply.get("files") or {}), reply.get("error_class"),
                   reply.get("error"), float(reply.get("started_at", 0.0)), float(reply.get("finished_at", 0.0)))


class Worker:
    """One warm child process running ``python -m agent.engine.worker``."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(env) if env is not None else None
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.last_used = 0.0     # monotonic: when it was started or last finished a task
        self.lock = asyncio.Lock()   # held while it runs a task, or while the pool retires it
        self.tasks_run = 0
        self._killed_by_us = False
        self._paused = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    #: the largest reply frame accepted from this worker
    max_frame = MAX_FRAME

    async def start(self) -> None:
        self.proc = await self._spawn({**os.environ, **(self.env or {})})
        self._killed_by_us = False
        self._paused = False
        assert self.proc.stdout is not None
        hello = await read_frame(self.proc.stdout, self.max_frame)
        if not hello.get("ready"):
            raise RuntimeError(f"worker sent {hello!r} instead of ready")
        self.started_at = self.last_used = time.monotonic()

    async def _spawn(self, env: dict[str, str]) -> asyncio.subprocess.Process:
        """Start the worker program (a sandboxed worker starts it inside bubblewrap)."""
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.engine.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True, limit=2**20)

    async def run(self, request: TaskRequest, on_progress: Callable[[float], None] | None = None,
                  cancel: asyncio.Event | None = None,
                  on_checkpoint: Callable[[str], None] | None = None) -> Outcome:
        """Run one task under its time limit. Never raises for task failures."""
        if not self.alive:
            await self.start()
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        started = time.time()
        proc.stdin.write(pack_frame(request.frame()))
        await proc.stdin.drain()
        deadline = time.monotonic() + request.timeout_s
        reader = proc.stdout
        cancelled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
        watch = self._task_watch(proc.pid, request.max_memory_gb)
        frame_task: asyncio.Future[Any] | None = None
        try:
            while True:
                if frame_task is None:
                    frame_task = asyncio.ensure_future(read_frame(reader, self.max_frame))
                waits: set[asyncio.Future[Any]] = {frame_task}
                if cancelled is not None:
                    waits.add(cancelled)
                left = max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(waits, timeout=min(left, WATCH_S) if watch else left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if watch is not None and not done and left > WATCH_S:
                    too_much = await asyncio.to_thread(watch.over)
                    if too_much is None:
                        continue   # still within its cap: keep reading frames
                    frame_task.cancel()
                    await self.kill()
                    return Outcome.failed(FailureClass.OOM, too_much, started)
                if frame_task not in done:
                    frame_task.cancel()
                    await self.kill()
                    if cancelled is not None and cancelled in done:
                        return Outcome.failed(FailureClass.AGENT_LOST, "task stopped: lease lost or cancelled",
                                              started)
                    return Outcome.failed(FailureClass.TIMEOUT,
                                          f"time limit of {request.timeout_s:g} s exceeded; task killed", started)
                try:
                    frame = frame_task.result()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return await self._died(started)
                except ValueError as exc:   # an oversized or garbled frame: the task wrote to our pipe
                    await self.kill()
                    return Outcome.failed(FailureClass.CRASHED, f"worker sent a malformed reply ({exc})", started)
                frame_task = None
                # the task's code shares the worker process and may write any frame to our pipe:
                # nothing in one may raise here or reach the heartbeat as NaN
                if not isinstance(frame, dict):
                    await self.kill()
                    return Outcome.failed(FailureClass.CRASHED, "worker sent a malformed reply (not a map)", started)
                if "progress" in frame:
                    value = frame["progress"]
                    if on_progress is not None and isinstance(value, int | float) and math.isfinite(value):
                        on_progress(min(max(float(value), 0.0), 1.0))
                elif "checkpoint" in frame:
                    if on_checkpoint is not None and isinstance(frame["checkpoint"], str):
                        on_checkpoint(frame["checkpoint"])
                elif "done" in frame:
                    self.tasks_run += 1
                    try:
                        outcome = self.task_outcome(Outcome.from_reply(frame["done"]))
                    except (TypeError, ValueError, AttributeError) as exc:
                        await self.kill()
                        return Outcome.failed(FailureClass.CRASHED, f"worker sent a malformed reply ({exc})", started)
                    if outcome.error_class == FailureClass.OOM.value:
                        await self.kill()  # a worker that hit its cap may be fragmented: start fresh
                    return outcome
        finally:
            if cancelled is not None:
                cancelled.cancel()

    def task_outcome(self, outcome: Outcome) -> Outcome:
        """The outcome the worker's reply claims, as this agent reports it: here, as claimed (the
        built-in kinds are ours); a sandbox narrows what submitter code may claim."""
        return outcome

    def _task_watch(self, pid: int, cap_gb: float | None) -> MemoryWatch | None:
        """What the run loop checks every ``WATCH_S``: the memory cap (a sandbox adds its disk cap)."""
        return MemoryWatch(pid, cap_gb) if cap_gb else None

    async def _died(self, started: float) -> Outcome:
        assert self.proc is not None
        code = self._exit_signal(await self.proc.wait())
        self.proc = None
        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGKILL and not self._killed_by_us:
                return Outcome.failed(FailureClass.OOM, "worker was killed by SIGKILL (the system ran out of "
                                      "memory)", started)
            return Outcome.failed(FailureClass.CRASHED, f"worker process crashed ({sig.name})", started)
        return Outcome.failed(FailureClass.CRASHED, f"worker process exited with status {code}", started)

    @staticmethod
    def _exit_signal(code: int) -> int:
        """The worker's exit status as ``Popen.returncode`` reports it (negative: a signal)."""
        return code

    def suspend(self) -> None:
        """SIGSTOP the worker (the volunteer needs the machine); ``resume`` continues it."""
        if self.alive and self.proc is not None and not self._paused:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.alive and self.proc is not None and self._paused:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self._paused = False

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._killed_by_us = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None
        self._paused = False   # the next process starts running: a later pause must stop it again

    async def close(self) -> None:
        """Ask the worker to exit (end of input); kill it if it does not within a second."""
        if self.proc is None:
            return
        if self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 1.0)
        await self.kill()


class WorkerPool:
    """One worker per slot. A worker process starts when its slot first gets a task (or at ``warm``)
    and stays warm for the next; :meth:`retire_idle` ends those that waited too long, so an idle
    agent is its daemon alone (a warm worker holds torch: ~200 MB)."""

    def __init__(self, size: int, env: Mapping[str, str] | None = None) -> None:
        self.workers = [Worker(env) for _ in range(size)]
        self._free: asyncio.Queue[Worker] = asyncio.Queue()
        self._suspended = False   # the agent is paused: a worker started now is stopped at once
        for worker in self.workers:
            self._free.put_nowait(worker)

    async def warm(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))

    @contextlib.asynccontextmanager
    async def worker(self) -> Any:
        worker = await self._free.get()
        try:
            async with worker.lock:   # waits out a retirement in progress
                if not worker.alive:
                    await worker.start()   # work arrived: start its process
                if self._suspended:
                    worker.suspend()   # started while the agent is paused: it waits like the others
                yield worker
        finally:
            worker.last_used = time.monotonic()
            self._free.put_nowait(worker)

    @property
    def alive(self) -> int:
        """Worker processes running now."""
        return sum(1 for w in self.workers if w.alive)

    async def retire_idle(self, idle_s: float) -> int:
        """End every worker process that has not run a task for ``idle_s`` seconds; returns how many.
        A worker in use is never touched (its lock is held)."""
        now = time.monotonic()
        retired = 0
        for worker in self.workers:
            if not worker.alive or worker.lock.locked() or now - worker.last_used < idle_s:
                continue
            async with worker.lock:
                if worker.alive:
                    worker.resume()   # a stopped (paused) process cannot read the end of its input
                    await worker.close()
                    retired += 1
        if retired:
            log.info("retired %d idle worker(s) after %.0f s without work", retired, idle_s)
        return retired

    def suspend_all(self) -> None:
        self._suspended = True
        for worker in self.workers:
            worker.suspend()

    def resume_all(self) -> None:
        self._suspended = False
        for worker in self.workers:
            worker.resume()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers))
