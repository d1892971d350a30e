"""The worker process: runs catalog kinds for the daemon, one task at a time.

Started once per slot and kept warm, so torch is imported once and not per task. A crash, a
segfault or an out-of-memory kill ends this process, never the daemon, which reports the task as a
classified failure and starts a fresh worker. Protocol: length-prefixed msgpack frames on stdin
(requests) and on a private copy of stdout (replies); the real stdout is pointed at stderr so a
kind that prints cannot corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.engine.frames import pack_frame, read_frame_sync
from agent.engine.sandbox import FSIZE_ENV, NPROC_ENV, SANDBOX_ENV
from agent.engine.violations import sandbox_violation
from jobs.catalog import get_kind
from jobs.errors import FailureClass, InvalidParams, PermanentError, RetryableError
from jobs.precheck import explain_refusal
from jobs.safeload import UnsafeInput
from security.errors import BadRequest

_PROGRESS_INTERVAL_S = 0.2


@dataclass
class WorkerContext:
    """The RunContext a kind sees inside the worker."""

    device: str
    threads: int
    workdir: Path
    out: IO[bytes]
    inputs: Mapping[str, Path] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)
    _last: float = 0.0
    _checkpoints: int = 0

    def progress(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL_S or fraction >= 1.0:
            self._last = now
            _send(self.out, {"progress": float(fraction)})

    def checkpoint(self, path: Path) -> None:
        """Hand a checkpoint to the daemon (which stores it on the board); a copy, because the kind
        overwrites its file at the next checkpoint."""
        self._checkpoints += 1
        copy = self.workdir / f".checkpoint-{self._checkpoints}{path.suffix}"
        shutil.copyfile(path, copy)
        _send(self.out, {"checkpoint": str(copy)})


def _send(out: IO[bytes], value: Any) -> None:
    out.write(pack_frame(value))
    out.flush()


def _limit_memory(max_memory_gb: float | None) -> None:
    """Cap this process's data segment at what it uses now plus the task's allowance."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if not max_memory_gb:
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
        return
    with open("/proc/self/status") as fh:
        data_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmData:"))
    limit = data_kb * 1024 + int(max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _set_threads(threads: int) -> None:
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, threads))
    else:   # not preloaded: the kind's own import of torch reads it
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))


def _limit_gpu_memory(device: str, fraction: float | None) -> None:
    """The volunteer's cap on GPU memory for this process (CUDA and ROCm builds alike)."""
    if not fraction or not device.startswith("cuda"):
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    torch.cuda.set_per_process_memory_fraction(min(max(float(fraction), 0.05), 1.0), index)


def _reset_device_peak(device: str) -> None:
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _peaks(device: str) -> dict[str, float]:
    """Peak memory: the worker's RSS high-water mark (over its life: warm workers are reused) and,
    on a CUDA/ROCm device, this task's peak allocation."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda") and "torch" in sys.modules:
        import torch

        peaks["peak_device_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return peaks


def run_task(request: Mapping[str, Any], out: IO[bytes]) -> dict[str, Any]:
    """Run one task; always returns a reply frame (failures are classified, not raised)."""
    workdir = Path(request["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = WorkerContext(device=request.get("device", "cpu"), threads=int(request.get("threads", 1)),
                        workdir=workdir, out=out,
                        inputs={k: Path(v) for k, v in (request.get("inputs") or {}).items()},
                        devices=tuple(request.get("devices") or ("cpu",)))
    started = time.time()
    me = os.getpid()
    try:
        kind = get_kind(request["kind"])
        params = kind.validate(request.get("params") or {})
        _set_threads(ctx.threads)
        _limit_gpu_memory(ctx.device, request.get("gpu_memory_fraction"))
        _limit_memory(request.get("max_memory_gb"))
        _reset_device_peak(ctx.device)
        try:
            output = kind.run(params, ctx)
        finally:
            if os.getpid() != me:   # a process the task forked is unwinding: it must not reply
                os._exit(0)
            _limit_memory(None)
        output.metrics.update(_peaks(ctx.device))
    except InvalidParams as exc:
        return _failure(FailureClass.INVALID_PARAMS, exc.message, started)
    except BadRequest as exc:  # e.g. a kind this agent's catalog does not have
        return _failure(FailureClass.UNSUPPORTED, exc.message, started)
    except UnsafeInput as exc:   # named as the manifest names the input: its file here is named by digest
        return _failure(exc.failure, _refusal(exc, ctx.inputs), started)
    except (RetryableError, PermanentError) as exc:   # the python kind wraps the code's own exception
        violation = sandbox_violation(exc, ctx) if os.environ.get(SANDBOX_ENV) == "1" else None
        if violation is not None:
            return _failure(FailureClass.SANDBOX_VIOLATION, violation, started)
        return _failure(exc.failure, str(exc), started)
    except Exception as exc:
        violation = sandbox_violation(exc, ctx) if os.environ.get(SANDBOX_ENV) == "1" else None
        if violation is not None:
            return _failure(FailureClass.SANDBOX_VIOLATION, violation, started)
        if _is_oom(exc):
            return _failure(FailureClass.OOM, f"out of memory: {str(exc)[:300]}", started)
        tail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return _failure(FailureClass.ERROR, tail[:2000], started)
    finished = time.time()
    return {"ok": True, "values": output.values, "metrics": {**output.metrics, "wall_s": finished - started},
            "notes": output.notes, "files": {k: str(v) for k, v in output.files.items()},
            "started_at": started, "finished_at": finished}


def _refusal(exc: UnsafeInput, inputs: Mapping[str, Path]) -> str:
    """An unsafe input's refusal, naming the input (``model``, not the blob digest) and how to fix it."""
    for name, path in inputs.items():
        if str(path) == exc.path:
            return explain_refusal(name, exc, path)
    return str(exc)


def _failure(failure: FailureClass, message: str, started: float) -> dict[str, Any]:
    return {"ok": False, "error_class": failure.value, "error": message, "started_at": started,
            "finished_at": time.time()}


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the daemon dies (even by SIGKILL), so an
    orphaned task never keeps running on a volunteer's machine."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1 and os.environ.get(SANDBOX_ENV) != "1":  # the parent died before prctl took effect
            # (in the sandbox, pid 1 is bubblewrap's init, which --die-with-parent ties to the daemon)
            os._exit(1)


def main() -> None:
    _die_with_parent()
    try:
        _serve()
    except BrokenPipeError:  # the daemon is gone: nobody to report to
        os._exit(1)


def _serve() -> None:
    if os.environ.get(NPROC_ENV):   # inside the sandbox's own user namespace: counted per namespace
        limit = int(os.environ[NPROC_ENV])
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    if os.environ.get(FSIZE_ENV):   # a write past it fails with EFBIG (Python ignores SIGXFSZ)
        size = int(os.environ[FSIZE_ENV])
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    # Before torch loads OpenMP: a waiting thread sleeps instead of spinning on a core that the
    # volunteer's own programs need (spinning made 2 threads ~100x slower than 1 on a busy machine,
    # agent/daemon/threads.py). An explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("PANAL_WORKER_PRELOAD", "1") == "1":
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401  -- warm start: import once, before the first task
    _send(out, {"ready": True, "pid": os.getpid()})
    while True:
        request = read_frame_sync(stdin)
        if request is None:
            return
        if request.get("op") == "run":
            reply = run_task(request, out)
        elif request.get("op") == "ping":
            reply = {"ok": True}
        else:
            reply = {"ok": False, "error_class": "error", "error": f"unknown op {request.get('op')!r}"}
        for stream in (sys.stdout, sys.stderr):   # the task's prints reach the log before its reply
            with contextlib.suppress(Exception):
                stream.flush()
        _send(out, {"done": reply})


if __name__ == "__main__":
    main()
