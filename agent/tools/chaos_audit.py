"""The audit at the end of ``panal bench chaos``: what the hub's store holds, read behind the hub's back.

The soak's verdict (every task done exactly once, one result row per task) must not take the hub's
word for it, so it reads the store directly: the hub's SQLite file, or the PostgreSQL database named
by ``store: postgresql://...``. Both read the same figures with the same queries (read-only; job ids
are bound parameters, never text in the SQL), then :func:`figures` turns them into the bench's
numbers, so a difference between the stores is a difference in what they hold, not in how it is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Holdings", "figures", "read_postgres", "read_sqlite", "read_store"]

#: SQLite: ``{marks}`` is one ``?`` per job id (placeholders only; the ids themselves are bound)
_LITE_TASKS = "SELECT COALESCE(SUM(n_tasks), 0), COUNT(*) FROM jobs WHERE id IN ({marks})"
_LITE_DONE = "SELECT COUNT(*) FROM tasks WHERE job_id IN ({marks}) AND state = 'done'"
_LITE_PER_TASK = "SELECT COUNT(*) FROM results WHERE job_id IN ({marks}) GROUP BY task_id"
_LITE_REQUEUES = "SELECT COALESCE(SUM(attempt - 1), 0) FROM tasks WHERE job_id IN ({marks})"
_LITE_FIRST_AFTER = "SELECT MIN(accepted_at) FROM results WHERE accepted_at >= ?"

#: PostgreSQL: the job ids as one bound text array
_PG_TASKS = "SELECT COALESCE(SUM(n_tasks), 0), COUNT(*) FROM jobs WHERE id = ANY($1::text[])"
_PG_DONE = "SELECT COUNT(*) FROM tasks WHERE job_id = ANY($1::text[]) AND state = 'done'"
_PG_PER_TASK = "SELECT COUNT(*) FROM results WHERE job_id = ANY($1::text[]) GROUP BY task_id"
_PG_REQUEUES = "SELECT COALESCE(SUM(attempt - 1), 0) FROM tasks WHERE job_id = ANY($1::text[])"
_PG_FIRST_AFTER = "SELECT MIN(accepted_at) FROM results WHERE accepted_at >= $1"


@dataclass(frozen=True)
class Holdings:
    """What the store holds for the soak's jobs, uncounted: the raw material of :func:`figures`."""

    n_tasks: int                    # tasks the submitted jobs declare
    jobs_found: int                 # of the submitted jobs, how many the store has
    done: int                       # tasks in state 'done'
    results_per_task: list[int]     # result rows per task that has any
    requeues: int                   # attempts beyond the first, summed
    first_after: list[float | None]  # per hub restart: the first result accepted since it came back


def read_store(store: str, hub_dir: Path, jobs: list[str], backs: list[float]) -> Holdings:
    """The holdings of the hub's store: its SQLite file under ``hub_dir`` (``store`` empty) or PostgreSQL."""
    if store.startswith(("postgresql://", "postgres://")):
        return asyncio.run(read_postgres(store, jobs, backs))
    return read_sqlite(hub_dir / "board.db", jobs, backs)


def read_sqlite(db: Path, jobs: list[str], backs: list[float]) -> Holdings:
    marks = ",".join("?" * len(jobs)) or "NULL"
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as conn:
        n_tasks, found = conn.execute(_LITE_TASKS.format(marks=marks), jobs).fetchone()
        (done,) = conn.execute(_LITE_DONE.format(marks=marks), jobs).fetchone()
        per_task = [int(n) for (n,) in conn.execute(_LITE_PER_TASK.format(marks=marks), jobs)]
        (requeues,) = conn.execute(_LITE_REQUEUES.format(marks=marks), jobs).fetchone()
        first = [conn.execute(_LITE_FIRST_AFTER, (back,)).fetchone()[0] for back in backs]
    return Holdings(int(n_tasks), int(found), int(done), per_task, int(requeues), first)


async def read_postgres(url: str, jobs: list[str], backs: list[float]) -> Holdings:
    import asyncpg  # the optional postgres extra: only a soak on a PostgreSQL store gets here

    conn = await asyncpg.connect(url, timeout=30)
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):   # one snapshot for all
            row = await conn.fetchrow(_PG_TASKS, jobs)
            assert row is not None   # an aggregate without GROUP BY always returns its one row
            done = await conn.fetchval(_PG_DONE, jobs)
            per_task = [int(r[0]) for r in await conn.fetch(_PG_PER_TASK, jobs)]
            requeues = await conn.fetchval(_PG_REQUEUES, jobs)
            first = [await conn.fetchval(_PG_FIRST_AFTER, back) for back in backs]
    finally:
        await conn.close()
    return Holdings(int(row[0]), int(row[1]), int(done), per_task, int(requeues),
                    [None if at is None else float(at) for at in first])


def figures(held: Holdings, jobs: int, tasks_per_job: int, downs: list[tuple[float, float]]) -> dict[str, Any]:
    """The bench's figures: tasks, done, results, duplicates, lost, requeues; hub recovery times.

    ``lost`` counts a task neither done nor with its result row, and every task of a submitted job the
    store does not have at all (the hub acknowledged it, then forgot it). A hub restart with no result
    accepted after it has no recovery time."""
    results = len(held.results_per_task)
    recovery = [round(first - killed, 2) for (killed, _), first in zip(downs, held.first_after, strict=True)
                if first is not None]
    return {"tasks": held.n_tasks, "done": held.done, "results": results,
            "duplicates": sum(n - 1 for n in held.results_per_task if n > 1),
            "lost": held.n_tasks - min(held.done, results) + (jobs - held.jobs_found) * tasks_per_job,
            "requeues": held.requeues,
            "hub_recovery_s": recovery, "hub_recovery_s_max": max(recovery, default=None)}
