"""``CodeContext``: what submitted code's ``run(params, ctx)`` sees, in the agent and in ``panal run-local``.

It wraps the worker's :class:`~jobs.kinds.base.RunContext` and keeps the submitter's code away from
the engine's plumbing: ``inputs`` holds only the job's own inputs (not the code bundle, not the
checkpoint, which is ``resume``), outputs are copied into the task's ``outputs/`` folder as regular
files (so the agent uploads what the code produced, never a path it merely named), and the log is
bounded (a task printing megabytes cannot flood a result).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.kinds.base import RunContext

__all__ = ["MAX_LOG_CHARS", "MAX_OUTPUTS", "CodeContext", "CodeUsageError"]

#: what ``ctx.log`` keeps: enough to see what happened, bounded so a result stays small
MAX_LOG_CHARS = 16_384
MAX_OUTPUTS = 16
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: inputs the engine supplies that are not the job's data
_ENGINE_INPUTS = ("code", "checkpoint")


class CodeUsageError(ValueError):
    """The code used the context wrongly (a bad output name, a checkpoint outside the work dir)."""


class CodeContext:
    """The context of one run of submitted code (attributes are read-only by convention).

    ``inputs``: name -> local, hash-checked file of each ``spec.inputs`` entry. ``device``: the torch
    device to use (``"cpu"``, ``"cuda:0"``, ``"mps"``). ``threads``: CPU threads the task may use (torch
    is already set to it). ``workdir``: a private scratch folder (the current directory while ``run``
    runs). ``resume``: the checkpoint file to resume from after an interruption, else None.
    """

    def __init__(self, run: RunContext, workdir: Path) -> None:
        self._run = run
        self.device: str = run.device
        self.threads: int = run.threads
        self.workdir: Path = workdir
        self.inputs: Mapping[str, Path] = {k: v for k, v in run.inputs.items() if k not in _ENGINE_INPUTS}
        self.resume: Path | None = run.inputs.get("checkpoint")
        self.outputs: dict[str, Path] = {}
        self._log: list[str] = []
        self._log_chars = 0
        self._log_dropped = 0
        self._out_dir = workdir / "outputs"

    def progress(self, fraction: float) -> None:
        """Report progress, 0.0 to 1.0 (rate-limited by the engine; call it as often as you like)."""
        self._run.progress(min(max(float(fraction), 0.0), 1.0))

    def checkpoint(self, path: str | Path) -> None:
        """Store the file ``path`` (complete when called) as this task's checkpoint: a retry after a
        crash, here or elsewhere, gets it back as ``ctx.resume`` (same file extension)."""
        file = self._inside(Path(path), "checkpoint")
        self._run.checkpoint(file)

    def output(self, name: str, value: str | Path | Mapping[str, Any]) -> Path:
        """Make ``name`` an output file of the task: a file's path (kept with its extension) or a map of
        name -> tensor (saved as ``<name>.safetensors``). Returns the stored file's path."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise CodeUsageError(f"output name must match [a-z][a-z0-9_]{{0,31}}, got {name!r}")
        if name not in self.outputs and len(self.outputs) >= MAX_OUTPUTS:
            raise CodeUsageError(f"at most {MAX_OUTPUTS} outputs per task")
        self._out_dir.mkdir(exist_ok=True)
        if isinstance(value, Mapping):
            target = self._out_dir / f"{name}.safetensors"
            _save_tensors(value, target)
        else:
            source = self._inside(Path(value), "output")
            target = self._out_dir / (name + source.suffix)
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        old = self.outputs.get(name)
        if old is not None and old != target:
            old.unlink(missing_ok=True)
        self.outputs[name] = target
        return target

    def log(self, *parts: Any) -> None:
        """A line for the result's notes (``print`` goes to the agent's log instead); bounded in total."""
        line = " ".join(str(p) for p in parts)[:1000]
        if self._log_chars + len(line) > MAX_LOG_CHARS:
            self._log_dropped += 1
            return
        self._log.append(line)
        self._log_chars += len(line)

    @property
    def log_lines(self) -> list[str]:
        """What ``log`` kept, with a last line counting what it dropped."""
        dropped = [f"... {self._log_dropped} more log line(s) dropped"] if self._log_dropped else []
        return [*self._log, *dropped]

    def _inside(self, path: Path, what: str) -> Path:
        """``path`` (relative to the work dir) as an existing regular file inside the work dir."""
        full = path if path.is_absolute() else self.workdir / path
        if full.is_symlink() or not full.is_file():
            raise CodeUsageError(f"{what} {path} is not a regular file")
        root = self.workdir.resolve()
        if not full.resolve().is_relative_to(root):
            raise CodeUsageError(f"{what} {path} is outside the task's work dir ({root})")
        return full


def _save_tensors(tensors: Mapping[str, Any], target: Path) -> None:
    import torch
    from safetensors.torch import save_file

    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not tensors:
        raise CodeUsageError(f"an output map holds name -> tensor entries; not tensors: {bad[:5]}"
                             if bad else "an output map of tensors is empty")
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(target))
