"""``panal run-local``: run a job's tasks on this machine, no board, to test before farming them out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from agent.cli.common import EXIT_FAILED, console, plain, print_json, run
from agent.daemon.threads import lent_threads, task_threads
from agent.engine.local import LocalTask, run_local
from jobs.manifest_files import load_manifests

__all__ = ["run_local_cmd"]


@click.command("run-local")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads lent to a task (default: all cores, as an agent with one slot lends); a task "
                   "asking `resources.threads` gets that many within it, as on an agent.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda:0, mps ...")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Keep each task's output files in DIR/task-N/.")
@click.option("--json", "as_json", is_flag=True, help="Print every task's params, values, metrics and error.")
def run_local_cmd(file: Path, threads: int | None, device: str, out_dir: Path | None, as_json: bool) -> None:
    """Run FILE's tasks (sweep points) here, one after another, as an agent would; print params and values."""
    manifests = load_manifests(file)
    results: list[dict[str, Any]] = []
    failed = False
    for manifest in manifests:
        if not as_json:
            click.echo(f"{manifest.name}: {manifest.n_units} task{'s' if manifest.n_units != 1 else ''} "
                       f"({manifest.kind}) on {device}", err=True)

        def show(task: LocalTask) -> None:
            if not as_json:
                state = "ok" if task.outcome.ok else f"{task.outcome.error_class}: {task.outcome.error}"
                click.echo(f"  task {task.index}: {state} ({task.outcome.metrics.get('wall_s', 0.0):.2f} s)",
                           err=True)

        sub = out_dir / manifest.name if out_dir is not None and len(manifests) > 1 else out_dir
        lent = lent_threads(threads or 0, None, os.cpu_count() or 1, 1)
        tasks = run(run_local(manifest, threads=task_threads(manifest.threads, lent), device=device, out_dir=sub,
                              on_done=show))
        failed = failed or any(not t.outcome.ok for t in tasks)
        if as_json:
            results.append({"name": manifest.name, "kind": manifest.kind, "tasks": [t.to_dict() for t in tasks]})
        else:
            console.print(local_table(tasks, list(manifest.sweep)))
    if as_json:
        print_json(results[0] if len(results) == 1 else results)
    if failed:
        sys.exit(EXIT_FAILED)


def local_table(tasks: list[LocalTask], swept: list[str]) -> Table:
    """One row per task: the swept params (all params when nothing is swept), then each returned value."""
    keys = swept or sorted({k for t in tasks for k in t.params})
    values: list[str] = []
    for t in tasks:
        values += [k for k in t.outcome.values if k not in values]
    table = Table(box=None)
    for col in ("TASK", *keys, *values, "SECONDS", "ERROR"):
        table.add_column(col.upper() if col in ("TASK", "SECONDS", "ERROR") else col)
    for t in tasks:
        o = t.outcome
        table.add_row(str(t.index), *(plain(_cell(t.params.get(k))) for k in keys),
                      *(plain(_cell(o.values.get(k))) for k in values),
                      f"{o.metrics.get('wall_s', 0.0):.2f}",
                      plain("" if o.ok else f"{o.error_class}: {o.error}"))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        text = json.dumps(value)
        return text if len(text) <= 24 else text[:21] + "..."
    return str(value)
