"""The SQLite store's schema and row writes: tables, the upgrade of databases made by earlier
versions, and the batch updates (hub/sqlite_store.py runs the statements; the row codecs it re-exports
live in hub/store_rows.py, shared with the PostgreSQL store).

Kept apart from the store so its writer-thread logic reads on its own; a new table or column goes
here (a new table in a ``CREATE TABLE IF NOT EXISTS`` block, a new column in ``_ADDED_COLUMNS`` so
an existing hub database gains it when it opens).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from hub.records import JobRow, TaskRow
from hub.store_rows import (
    JOB_COLS,
    TASK_COLS,
    job_row,
    job_update_values,
    job_values,
    pack,
    pack_optional,
    task_row,
    task_update_values,
    task_values,
    unpack,
)

__all__ = ["JOB_COLS", "TASK_COLS", "create_schema", "job_row", "job_values", "marks", "pack", "pack_optional",
           "task_row", "task_values", "unpack", "update_jobs", "update_tasks"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, name TEXT NOT NULL,
    capabilities TEXT NOT NULL, registered_at REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS submitters (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, name TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, submitter_id TEXT NOT NULL, kind TEXT NOT NULL,
    priority INTEGER NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, n_tasks INTEGER NOT NULL,
    envelope BLOB NOT NULL, requires TEXT NOT NULL, timeout_s REAL NOT NULL, max_attempts INTEGER NOT NULL,
    deadline_at REAL, finished_at REAL, error TEXT, labels TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL,
    params BLOB NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, lease_id TEXT, agent_id TEXT,
    lease_expires_at REAL, error TEXT, error_class TEXT, progress REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL, checkpoint TEXT, checkpoint_record BLOB);
CREATE INDEX IF NOT EXISTS tasks_job ON tasks(job_id, idx);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT PRIMARY KEY REFERENCES tasks(id), job_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    agent_id TEXT NOT NULL, record BLOB NOT NULL, digest TEXT NOT NULL, accepted_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS results_job ON results(job_id);
CREATE TABLE IF NOT EXISTS admission_tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, label TEXT NOT NULL, max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, revoked_at REAL);
"""
#: who uploaded which blob (#16 parts 5-6): GET access for the uploader, per-key quotas on what no job
#: claimed yet. Separate so an older hub database gains it on open.
PRIVACY_SCHEMA = """
CREATE INDEX IF NOT EXISTS jobs_submitter ON jobs(submitter_id, created_at);
CREATE TABLE IF NOT EXISTS blob_uploads (
    sha256 TEXT NOT NULL, key_id TEXT NOT NULL, size INTEGER NOT NULL, uploaded_at REAL NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (sha256, key_id));
CREATE INDEX IF NOT EXISTS blob_uploads_key ON blob_uploads(key_id, claimed);
"""

#: result validation (hub/trust/): reputation per (agent, kind), credit per agent and owner, each
#: settled unit's validation record, and quarantines for invalid results (kept across restarts)
TRUST_SCHEMA = """
CREATE TABLE IF NOT EXISTS trust_reputation (
    agent_id TEXT NOT NULL, kind TEXT NOT NULL, consecutive_valid INTEGER NOT NULL, valid INTEGER NOT NULL,
    invalid INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (agent_id, kind));
CREATE TABLE IF NOT EXISTS trust_credit (
    holder TEXT PRIMARY KEY, credit REAL NOT NULL, results INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trust_validations (
    job_id TEXT NOT NULL, unit INTEGER NOT NULL, state TEXT NOT NULL, quorum INTEGER NOT NULL,
    canonical_task TEXT, agents TEXT NOT NULL, detail BLOB NOT NULL, decided_at REAL NOT NULL,
    PRIMARY KEY (job_id, unit));
CREATE TABLE IF NOT EXISTS trust_bans (
    agent_id TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL, until REAL NOT NULL);
"""

#: the status page's 24-hour history (hub/status_history.py): one row per interval; an older hub database
#: gains the table when it opens
STATUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS status_history (
    start REAL PRIMARY KEY, done INTEGER NOT NULL, failed INTEGER NOT NULL, agents INTEGER NOT NULL,
    backlog INTEGER NOT NULL);
"""


def marks(columns: str) -> str:
    return ",".join("?" * len(columns.split(",")))


def update_tasks(c: sqlite3.Connection, tasks: Sequence[TaskRow]) -> None:
    c.executemany(
        "UPDATE tasks SET state=?, attempt=?, lease_id=?, agent_id=?, lease_expires_at=?, error=?, "
        "error_class=?, progress=?, updated_at=?, checkpoint=?, checkpoint_record=? WHERE id=?",
        [task_update_values(t) for t in tasks])


# -- provenance (checkpoint records): columns added to databases of earlier versions ----------------------
_ADDED_COLUMNS = (("tasks", "checkpoint_record", "BLOB"),
                  # result validation (hub/trust/): the unit a row is an instance of, a job's validation policy
                  ("tasks", "unit", "INTEGER"), ("jobs", "validation", "TEXT NOT NULL DEFAULT '{}'"),
                  # owners (hub/trust/ keeps one owner's machines apart): set by the admission token
                  ("agents", "owner", "TEXT"), ("admission_tokens", "owner", "TEXT NOT NULL DEFAULT ''"),
                  # reading sweeps (hub/best.py): the manifest's spec.report and the best task so far
                  ("jobs", "report", "TEXT NOT NULL DEFAULT '{}'"), ("jobs", "best", "TEXT"))


def create_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing: tables, indexes, and the columns earlier versions lacked."""
    conn.executescript(SCHEMA)
    _upgrade(conn)
    conn.executescript(PRIVACY_SCHEMA)
    conn.executescript(TRUST_SCHEMA)
    conn.executescript(STATUS_SCHEMA)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Add the columns a database made by an earlier version lacks (its rows keep NULL there)."""
    for table, column, decl in _ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def update_jobs(c: sqlite3.Connection, jobs: Sequence[JobRow]) -> None:
    c.executemany("UPDATE jobs SET state=?, finished_at=?, error=?, best=? WHERE id=?",
                  [job_update_values(j) for j in jobs])
