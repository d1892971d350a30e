"""Row codecs every SQL store shares: how board records become column values and back.

SQLite (hub/sqlite_rows.py) and PostgreSQL (hub/pg_store.py) store the same columns in the same
encodings (msgpack for signed records and params, JSON text for small dicts), so one codec here keeps
the two stores from drifting apart; only the SQL dialect and the placeholders differ per store.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import msgpack

from hub.records import AgentRow, JobRow, JobState, TaskRow, TaskState

__all__ = ["AGENT_COLS", "JOB_COLS", "TASK_COLS", "Row", "agent_row", "agent_values", "job_row",
           "job_update_values", "job_values", "json_optional", "pack", "pack_optional", "task_row",
           "task_update_values", "task_values", "unpack"]



class Row(Protocol):
    """A fetched row as either driver returns it (a tuple from sqlite3, a Record from asyncpg)."""

    def __getitem__(self, index: int, /) -> Any: ...


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def pack_optional(value: Any) -> bytes | None:
    return None if value is None else pack(value)


def json_optional(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


JOB_COLS = ("id, name, submitter_id, kind, priority, state, created_at, n_tasks, envelope, requires, "
             "timeout_s, max_attempts, deadline_at, finished_at, error, labels, validation, report, best")
TASK_COLS = ("id, job_id, idx, params, state, attempt, lease_id, agent_id, lease_expires_at, error, "
              "error_class, progress, updated_at, checkpoint, checkpoint_record, unit")
AGENT_COLS = "id, public_key, name, capabilities, registered_at, last_seen, owner"


def job_values(j: JobRow) -> tuple[Any, ...]:
    return (j.id, j.name, j.submitter_id, j.kind, j.priority, j.state.value, j.created_at, j.n_tasks,
            pack(j.envelope), json.dumps(j.requires), j.timeout_s, j.max_attempts, j.deadline_at,
            j.finished_at, j.error, json.dumps(j.labels), json.dumps(j.validation), json.dumps(j.report),
            json_optional(j.best))


def job_row(r: Row) -> JobRow:
    return JobRow(id=r[0], name=r[1], submitter_id=r[2], kind=r[3], priority=r[4], state=JobState(r[5]),
                  created_at=r[6], n_tasks=r[7], envelope=unpack(r[8]), requires=json.loads(r[9]),
                  timeout_s=r[10], max_attempts=r[11], deadline_at=r[12], finished_at=r[13], error=r[14],
                  labels=json.loads(r[15]), validation=json.loads(r[16] or "{}"), report=json.loads(r[17] or "{}"),
                  best=json.loads(r[18]) if r[18] else None)


def job_update_values(j: JobRow) -> tuple[Any, ...]:
    """(state, finished_at, error, best, id): what a job's progress rewrites."""
    return (j.state.value, j.finished_at, j.error, json_optional(j.best), j.id)


def task_values(t: TaskRow) -> tuple[Any, ...]:
    return (t.id, t.job_id, t.idx, pack(t.params), t.state.value, t.attempt, t.lease_id, t.agent_id,
            t.lease_expires_at, t.error, t.error_class, t.progress, t.updated_at, t.checkpoint,
            pack_optional(t.checkpoint_record), t.unit)


def task_row(r: Row) -> TaskRow:
    return TaskRow(id=r[0], job_id=r[1], idx=r[2], params=unpack(r[3]), state=TaskState(r[4]),
                   attempt=r[5], lease_id=r[6], agent_id=r[7], lease_expires_at=r[8], error=r[9],
                   error_class=r[10], progress=r[11], updated_at=r[12], checkpoint=r[13],
                   checkpoint_record=unpack(r[14]) if r[14] is not None else None, unit=r[15])


def task_update_values(t: TaskRow) -> tuple[Any, ...]:
    """(state, attempt, lease_id, agent_id, lease_expires_at, error, error_class, progress, updated_at,
    checkpoint, checkpoint_record, id): what save_tasks and accept_results rewrite of a task."""
    return (t.state.value, t.attempt, t.lease_id, t.agent_id, t.lease_expires_at, t.error, t.error_class,
            t.progress, t.updated_at, t.checkpoint, pack_optional(t.checkpoint_record), t.id)


def agent_values(a: AgentRow) -> tuple[Any, ...]:
    return (a.id, a.public_key, a.name, json.dumps(a.capabilities), a.registered_at, a.last_seen, a.owner)


def agent_row(r: Row) -> AgentRow:
    return AgentRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6])
