"""Single-use workers inside the sandbox, started ahead of need, for kinds that run submitter code.

Same worker program and frame protocol as a warm worker (:mod:`agent.engine.runner`), but started
inside bubblewrap (:mod:`agent.engine.sandbox`) and used for exactly one task: no state (imported
modules, files, threads) passes from one submitter's code to the next. To keep the start cost off
the task's path (torch's import takes seconds), ``SandboxPool`` (:mod:`agent.engine.sandbox_pool`) keeps
one started sandbox ready per placement (CPU, or GPU with the device nodes bound) and starts the next as one
is taken.

Each sandbox owns a private directory ``root`` under the agent's work dir, bound at the same path
inside, so the request's paths are valid on both sides: ``root/work`` (writable, the task's work
dir) and ``root/inputs`` (read-only inside; the task's inputs are hard-linked in, or copied across
file systems, when the task arrives). What comes back out is confined: a checkpoint or output file
must be a regular file directly written by the task under ``root/work`` (a symlink to the agent's
key is refused), read only after the sandbox is dead. The worker's stdout/stderr keep a bounded
tail, reported with a failure, so printing megabytes cannot flood the volunteer's log or disk. What of the
task's reply the agent believes (failure classes, size) is :mod:`agent.engine.sandbox_reply`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from agent.engine.memwatch import MemoryWatch
from agent.engine.runner import Outcome, TaskRequest, Worker
from agent.engine.sandbox import FSIZE_ENV, MAX_PROCESSES, NPROC_ENV, PidsCgroup, bwrap_argv, pids_cgroup, probe
from agent.engine.sandbox_reply import bounded, claimed
from agent.engine.sandbox_watch import SandboxWatch, remove_tree
from jobs.errors import FailureClass
from security.errors import PanalError

__all__ = ["DISK_BYTES", "SandboxedWorker"]

log = logging.getLogger(__name__)

#: how much of the task's stdout/stderr is kept (the end of it)
TAIL_BYTES = 8 * 1024
#: how much of that tail a failure's message carries to the submitter
ERROR_TAIL_CHARS = 1000
#: a sandboxed task's reply frame (values, metrics) is bounded far below a trusted worker's
SANDBOX_MAX_FRAME = 32 * 2**20
#: what a sandbox's files may take on the volunteer's disk, all together (and any one file)
DISK_BYTES = 8 * 2**30
#: how long the agent waits for every process of a killed sandbox to be gone before reading its files
REAP_S = 10.0


class SandboxedWorker(Worker):
    """One worker inside bubblewrap, for one task."""

    max_frame = SANDBOX_MAX_FRAME

    def __init__(self, base: Path, *, gpu: bool, exclude: Iterable[Path] = (), disk_bytes: int = DISK_BYTES) -> None:
        super().__init__()
        self.gpu = gpu
        self.disk_bytes = disk_bytes
        self._work_id: tuple[int, int] | None = None   # (st_dev, st_ino) of root/work as the agent made it
        self._tree_pids: list[psutil.Process] = []
        self._ck_task: asyncio.Future[None] | None = None   # the checkpoint copy under way
        self._ck_last: Path | None = None                    # its file, until the daemon has stored it
        self.root = base / f".sandbox-{uuid.uuid4().hex[:12]}"
        self.exclude = [*exclude, Path.home()]
        self.output_bytes = 0
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._drain: asyncio.Task[None] | None = None
        self._cgroup: PidsCgroup | None = None
        self.used = False
        self._watch: SandboxWatch | None = None

    async def _spawn(self, env: dict[str, str]) -> asyncio.subprocess.Process:
        status = probe()
        if not status.available:
            raise PanalError(f"no sandbox: {status.reason}", code="no_sandbox")
        (self.root / "work").mkdir(parents=True)
        (self.root / "inputs").mkdir()
        work = os.lstat(self.root / "work")
        self._work_id = (work.st_dev, work.st_ino)
        argv = bwrap_argv(self.root, gpu=self.gpu, exclude=self.exclude)
        argv += ["--setenv", FSIZE_ENV, str(self.disk_bytes)]
        if status.process_limit == "cgroup":
            self._cgroup = pids_cgroup(MAX_PROCESSES)
            if self._cgroup is None:
                raise PanalError("no sandbox: the pids cgroup for its process limit could not be made",
                                 code="no_sandbox")
        else:
            argv += ["--setenv", NPROC_ENV, str(MAX_PROCESSES)]
        group = self._cgroup
        proc = await asyncio.create_subprocess_exec(
            *argv, _python(), "-m", "agent.engine.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            limit=2**20, preexec_fn=group.enter if group is not None else None)
        assert proc.stderr is not None
        self._drain = asyncio.ensure_future(self._keep_tail(proc.stderr))
        return proc

    async def start(self) -> None:
        """Start the sandbox and its worker; a sandbox that dies on the way is a clear error."""
        try:
            await super().start()
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError) as exc:
            await self.kill()
            if self._drain is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._drain, 2.0)
            raise PanalError(f"the sandbox did not start: {self.tail().strip()[-500:] or exc}",
                             code="no_sandbox") from exc

    async def _keep_tail(self, stream: asyncio.StreamReader) -> None:
        """Read the task's output as it comes, keeping only its last ``TAIL_BYTES``."""
        while chunk := await stream.read(65536):
            self.output_bytes += len(chunk)
            self._tail.append(chunk)
            self._tail_size += len(chunk)
            while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
                self._tail_size -= len(self._tail.popleft())

    def tail(self) -> str:
        return b"".join(self._tail)[-TAIL_BYTES:].decode(errors="replace")

    @staticmethod
    def _exit_signal(code: int) -> int:
        """bwrap exits with 128 + N when its child was killed by signal N."""
        return -(code - 128) if 128 < code < 128 + 65 else code

    def task_outcome(self, outcome: Outcome) -> Outcome:
        """Submitter code writes its own reply frame, so it could claim a failure that blames the agent
        or its device (``device_lost``, ``agent_lost``) to be retried elsewhere and mark honest agents;
        only the classes its own code can cause stand, anything else is reported as ``crashed``."""
        return claimed(outcome)

    def _task_watch(self, pid: int, cap_gb: float | None) -> MemoryWatch | None:
        self._watch = SandboxWatch(pid, cap_gb, self.root / "work", self.disk_bytes)
        return self._watch

    async def run(self, request: TaskRequest, on_progress: Callable[[float], None] | None = None,
                  cancel: asyncio.Event | None = None,
                  on_checkpoint: Callable[[str], None] | None = None) -> Outcome:
        """Run ``request`` in this sandbox, then end the sandbox; files come back to ``request.workdir``."""
        if self.used:
            raise RuntimeError("a sandboxed worker runs one task only")
        self.used = True
        if not self.alive:
            await self.start()
        inner = replace(request, workdir=str(self.root / "work"), inputs=await asyncio.to_thread(
            self._place_inputs, request.inputs))
        checkpoint = None if on_checkpoint is None else self._confined_checkpoint(on_checkpoint, request.workdir)
        self._tree_pids = self._tree()   # bwrap's init among them: its end is the pid namespace's end
        try:
            outcome = await super().run(inner, on_progress, cancel, checkpoint)
        finally:
            self._kill_now()   # nothing of the task may run on once it has answered
            if self._ck_task is not None:
                await asyncio.gather(self._ck_task, return_exceptions=True)
        outcome = bounded(outcome)
        if outcome.error_class == FailureClass.OOM.value and self._watch is not None and self._watch.disk_violation:
            outcome = Outcome.failed(FailureClass.SANDBOX_VIOLATION, self._watch.disk_violation, outcome.started_at)
        if outcome.error_class == FailureClass.OOM.value and self._watch is not None and self._watch.crowded:
            outcome = Outcome.failed(FailureClass.SANDBOX_VIOLATION, f"process limit: the task ran "
                                     f"{self._watch.crowded} processes at once (a fork bomb?) and went past its "
                                     f"memory cap; the sandbox allows {MAX_PROCESSES} processes; task killed",
                                     outcome.started_at)
        if outcome.ok and not outcome.files:
            return outcome   # nothing to read back: the sandbox is reaped and removed off the task's path
        await self.kill()    # its files are read only once every process of it is gone
        if not await asyncio.to_thread(self._all_gone):
            self.remove()
            return Outcome.failed(FailureClass.SANDBOX_VIOLATION, "the sandbox's processes did not end when "
                                  "killed; its files were not read", outcome.started_at)
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain, 2.0)
        return await asyncio.to_thread(self._finish, outcome, Path(request.workdir))

    def _kill_now(self) -> None:
        """SIGKILL the sandbox (bwrap; its processes follow through --die-with-parent); reaped later."""
        if self.proc is not None and self.proc.returncode is None:
            self._killed_by_us = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _all_gone(self) -> bool:
        """Wait until every process the sandbox had when killed is gone (or a zombie). bubblewrap's
        init is one of them, and the kernel ends a pid namespace's init only after every other process
        in it, so a grandchild forked later cannot outlive this: nothing writes while the agent reads."""
        procs = self._tree_pids
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(procs, timeout=REAP_S)
        return all(_zombie(p) for p in alive)

    def _work_fd(self) -> int | None:
        """An open descriptor of ``root/work`` if it is still the directory the agent made (the code
        may rename it and leave a symlink to the agent's home in its place), else None."""
        try:
            fd = os.open(self.root / "work", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._work_id:
            os.close(fd)
            return None
        return fd

    def _place_inputs(self, inputs: dict[str, str] | Any) -> dict[str, str]:
        """Hard-link (else copy) each input into the read-only ``inputs`` dir; paths as seen inside."""
        placed = {}
        for name, path in dict(inputs).items():
            dest = self.root / "inputs" / name
            try:
                os.link(path, dest)
            except OSError:
                shutil.copyfile(path, dest)
            placed[name] = str(dest)
        return placed

    def _confined_checkpoint(self, on_checkpoint: Callable[[str], None], workdir: str) -> Callable[[str], None]:
        """A checkpoint frame names a file; the code is still running, so it is copied out (not
        followed through a link) before the daemon stores it."""
        out_dir = Path(workdir)

        async def store(path: str, copy: Path) -> None:
            if await asyncio.to_thread(self._copy_regular, Path(path), copy):
                on_checkpoint(str(copy))
            else:
                await asyncio.to_thread(copy.unlink, missing_ok=True)
                log.warning("sandboxed task named checkpoint %s: not a regular file of its work dir, or over "
                            "its disk cap: ignored", path)

        def take(path: str) -> None:
            # one copy at a time, off the event loop: the code may name its largest file in frame
            # after frame, and each copy lands outside the sandbox's disk cap until it is uploaded
            # (the daemon deletes it then); a checkpoint named meanwhile is skipped
            if (self._ck_task is not None and not self._ck_task.done()) or (
                    self._ck_last is not None and self._ck_last.exists()):
                log.warning("sandboxed task named checkpoint %s while its last one is still being stored: "
                            "skipped", path)
                return
            self._ck_last = out_dir / f"checkpoint-{uuid.uuid4().hex[:8]}"
            self._ck_task = asyncio.ensure_future(store(path, self._ck_last))
        return take

    def _copy_regular(self, path: Path, dest: Path) -> bool:
        """Copy ``path`` if it is a regular file directly in ``root/work`` (no link followed)."""
        if path.parent != self.root / "work":
            return False
        work = self._work_fd()
        if work is None:
            return False
        try:   # by name in the pinned directory; O_NONBLOCK: a FIFO must not block the agent's loop
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=work)
        except OSError:
            return False
        finally:
            os.close(work)
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return False
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as out:
                left = self.disk_bytes
                while chunk := src.read(min(2**20, left + 1)):
                    left -= len(chunk)
                    if left < 0:
                        return False
                    out.write(chunk)
        return True

    def _finish(self, outcome: Outcome, workdir: Path) -> Outcome:
        """Move the task's work dir to ``workdir`` (the sandbox is dead), keep only output files that
        are regular files inside it, add the output tail to a failure, and remove the sandbox."""
        work = self.root / "work"
        files: dict[str, str] = {}
        refused: list[str] = []
        fd = self._work_fd()
        if fd is None:
            self.remove()
            return Outcome.failed(FailureClass.SANDBOX_VIOLATION, "the task replaced its work dir (with a link "
                                  "out of the sandbox?); nothing of it was read", outcome.started_at)
        os.close(fd)
        try:
            workdir.parent.mkdir(parents=True, exist_ok=True)
            if workdir.exists():
                for child in work.iterdir():
                    os.replace(child, workdir / child.name)
            else:
                os.replace(work, workdir)
            for name, text in outcome.files.items():
                path = workdir / Path(text).relative_to(work) if Path(text).is_relative_to(work) else None
                if path is None or not _regular_inside(path, workdir):
                    refused.append(f"{name} ({text})")
                    continue
                files[name] = str(path)
        finally:
            self.remove()
        if refused:
            return Outcome.failed(FailureClass.SANDBOX_VIOLATION, "output files outside the task's work dir or "
                                  "not regular files: " + ", ".join(refused[:5]), outcome.started_at)
        outcome.files = files
        if not outcome.ok:
            shown = self.tail().strip()[-ERROR_TAIL_CHARS:]
            if shown:
                outcome.error = (f"{outcome.error}\n--- the last {len(shown)} characters of the task's output "
                                 f"({self.output_bytes} bytes in all) ---\n{shown}")
        return outcome

    def remove(self) -> None:
        remove_tree(self.root)
        if self._cgroup is not None:
            self._cgroup.remove()

    def _tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def suspend(self) -> None:
        """SIGSTOP every process of the sandbox (it runs in its own session, out of our group's reach)."""
        if self.alive and not self._paused:
            for proc in self._tree():
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.alive and self._paused:
            for proc in self._tree():
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
            self._paused = False

    async def close(self) -> None:
        await super().close()
        if self._drain is not None:
            self._drain.cancel()
        await asyncio.to_thread(self.remove)


def _regular_inside(path: Path, workdir: Path) -> bool:
    try:
        real = Path(os.path.realpath(path))
        return real.is_relative_to(os.path.realpath(workdir)) and stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _python() -> str:
    import sys

    return sys.executable

