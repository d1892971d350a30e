"""``panal run-local``: a job's tasks run here, no board, through the agent's own worker program.

Each unit of the manifest (sweep point x shard) runs in one warm :class:`~agent.engine.runner.Worker`
with the task's time and memory limits, its inputs as the local files the manifest names, and
``spec.code`` packed exactly as ``panal submit`` packs it (the same bytes, so the same digest). The
worker, the kind and the ``CodeContext`` are the agent's, so a result for the same params and
thread count on the CPU is the one an agent returns. What it does not do: fetch blobs from a board,
run in the sandbox (it is your code on your machine), or compare replicas.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.engine.runner import Outcome, TaskRequest, Worker
from jobs.code_spec import bundle_manifest
from jobs.manifest import Manifest
from security.errors import BadRequest

__all__ = ["LocalTask", "run_local"]


@dataclass
class LocalTask:
    """One unit's run: its index, params and the worker's outcome (files copied under ``out_dir``)."""

    index: int
    params: dict[str, Any]
    outcome: Outcome

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        return {"task": self.index, "params": self.params, "ok": o.ok, "values": o.values, "metrics": o.metrics,
                "notes": o.notes, "files": o.files, "error_class": o.error_class, "error": o.error}


def local_inputs(manifest: Manifest) -> dict[str, str]:
    """The manifest's inputs as local paths; an input already uploaded (a blob) cannot run here."""
    paths = {}
    for name, ref in manifest.inputs.items():
        if ref.path is None:
            raise BadRequest(f"spec.inputs.{name} is a blob on a board; run-local needs the local file")
        path = Path(ref.path) if Path(ref.path).is_absolute() else (manifest.base_dir or Path(".")) / ref.path
        paths[name] = str(path.resolve())
    return paths


async def run_local(manifest: Manifest, *, threads: int, device: str = "cpu", out_dir: Path | None = None,
                    on_done: Callable[[LocalTask], None] | None = None,
                    env: dict[str, str] | None = None) -> list[LocalTask]:
    """Run every unit of ``manifest`` in order in one warm worker; failures are outcomes, not raised."""
    done: list[LocalTask] = []
    with tempfile.TemporaryDirectory(prefix="panal-local-") as tmp:
        root = Path(tmp)
        manifest, _ = bundle_manifest(manifest, root / "bundle")
        inputs = local_inputs(manifest)
        worker = Worker(env)
        await worker.start()
        try:
            for index, params in enumerate(manifest.points()):
                workdir = root / f"task-{index}"
                request = TaskRequest(kind=manifest.kind, params=params, timeout_s=manifest.timeout_s,
                                      workdir=str(workdir), device=device, devices=(device,), threads=threads,
                                      max_memory_gb=manifest.memory_cap_gb, inputs=inputs)
                outcome = await worker.run(request)
                outcome.files = (_keep(outcome.files, out_dir / f"task-{index}") if out_dir is not None
                                 else {name: Path(text).name for name, text in outcome.files.items()})
                task = LocalTask(index, params, outcome)
                done.append(task)
                if on_done is not None:
                    on_done(task)
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            await worker.close()
    return done


def _keep(files: dict[str, str], folder: Path) -> dict[str, str]:
    """Copy a task's output files out of its work dir (removed afterwards) into ``folder``."""
    kept = {}
    for name, text in files.items():
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(text).name
        shutil.copyfile(text, target)
        kept[name] = str(target)
    return kept
