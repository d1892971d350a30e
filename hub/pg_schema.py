"""The PostgreSQL store's schema as numbered migrations, applied in order and recorded.

SQLite databases upgrade themselves column by column at open (hub/sqlite_rows.py); a PostgreSQL
database is shared by several hubs and administered by an operator, so its schema moves in explicit,
versioned steps: ``panal_migrations`` lists what was applied and when. Hubs apply what is missing when
they start (``panal hub migrate`` does the same on its own and says what it did); an advisory lock
makes two hubs starting at once apply each step exactly once. A database whose schema is newer than
this code is refused rather than written to with the wrong columns.

The tables mirror the SQLite ones column for column (the row codecs in hub/store_rows.py serve both):
REAL becomes DOUBLE PRECISION, BLOB becomes BYTEA, and ids sort bytewise (``COLLATE "C"``), as in
SQLite, whatever the cluster's locale. A change to the schema is a new entry at the end of MIGRATIONS,
never an edit of an applied one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from security.errors import Unavailable

__all__ = ["MIGRATIONS", "Migration", "describe_url", "migrate", "migrate_database", "schema_version"]

#: pg_advisory_xact_lock key for schema changes: b"panalmig" as an int64
_LOCK_KEY = int.from_bytes(b"panalmig", "big") - (1 << 63)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


_ID = 'TEXT COLLATE "C"'

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "board tables: agents, submitters, jobs, tasks, results, admission tokens, blob uploads, trust", f"""
CREATE TABLE agents (
    id {_ID} PRIMARY KEY, public_key TEXT NOT NULL, name TEXT NOT NULL, capabilities TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL, owner TEXT);
CREATE TABLE submitters (
    id {_ID} PRIMARY KEY, public_key TEXT NOT NULL, name TEXT NOT NULL, added_at DOUBLE PRECISION NOT NULL,
    seq BIGSERIAL NOT NULL);
CREATE TABLE jobs (
    id {_ID} PRIMARY KEY, name TEXT NOT NULL, submitter_id {_ID} NOT NULL, kind TEXT NOT NULL,
    priority INTEGER NOT NULL, state TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, n_tasks INTEGER NOT NULL,
    envelope BYTEA NOT NULL, requires TEXT NOT NULL, timeout_s DOUBLE PRECISION NOT NULL,
    max_attempts INTEGER NOT NULL, deadline_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, error TEXT,
    labels TEXT NOT NULL DEFAULT '{{}}', validation TEXT NOT NULL DEFAULT '{{}}',
    report TEXT NOT NULL DEFAULT '{{}}', best TEXT);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_submitter ON jobs(submitter_id, created_at);
CREATE TABLE tasks (
    id {_ID} PRIMARY KEY, job_id {_ID} NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL,
    params BYTEA NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, lease_id TEXT, agent_id TEXT,
    lease_expires_at DOUBLE PRECISION, error TEXT, error_class TEXT, progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL, checkpoint TEXT, checkpoint_record BYTEA, unit INTEGER);
CREATE INDEX tasks_job ON tasks(job_id, idx);
CREATE INDEX tasks_checkpoint ON tasks(checkpoint) WHERE checkpoint IS NOT NULL;
CREATE TABLE results (
    task_id {_ID} PRIMARY KEY REFERENCES tasks(id), job_id {_ID} NOT NULL, attempt INTEGER NOT NULL,
    agent_id TEXT NOT NULL, record BYTEA NOT NULL, digest TEXT NOT NULL, accepted_at DOUBLE PRECISION NOT NULL);
CREATE INDEX results_job ON results(job_id);
CREATE TABLE admission_tokens (
    id {_ID} PRIMARY KEY, secret_hash TEXT NOT NULL, label TEXT NOT NULL, max_uses INTEGER NOT NULL,
    uses INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION, owner TEXT NOT NULL DEFAULT '');
CREATE TABLE blob_uploads (
    sha256 TEXT NOT NULL, key_id TEXT NOT NULL, size BIGINT NOT NULL, uploaded_at DOUBLE PRECISION NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (sha256, key_id));
CREATE INDEX blob_uploads_key ON blob_uploads(key_id, claimed);
CREATE TABLE trust_reputation (
    agent_id TEXT NOT NULL, kind TEXT NOT NULL, consecutive_valid INTEGER NOT NULL, valid INTEGER NOT NULL,
    invalid INTEGER NOT NULL, updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (agent_id, kind));
CREATE TABLE trust_credit (holder TEXT PRIMARY KEY, credit DOUBLE PRECISION NOT NULL, results BIGINT NOT NULL);
CREATE TABLE trust_validations (
    job_id {_ID} NOT NULL, unit INTEGER NOT NULL, state TEXT NOT NULL, quorum INTEGER NOT NULL,
    canonical_task TEXT, agents TEXT NOT NULL, detail BYTEA NOT NULL, decided_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, unit));
CREATE TABLE trust_bans (
    agent_id TEXT PRIMARY KEY, reason TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
    until DOUBLE PRECISION NOT NULL);
"""),
    Migration(2, "the status page's 24-hour history (hub/status_history.py)", """
CREATE TABLE status_history (
    start DOUBLE PRECISION PRIMARY KEY, done BIGINT NOT NULL, failed BIGINT NOT NULL, agents INTEGER NOT NULL,
    backlog BIGINT NOT NULL);
"""),
)

_LEDGER = """CREATE TABLE IF NOT EXISTS panal_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"""


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest migration applied to this database (0: none, or no panal schema at all)."""
    if await conn.fetchval("SELECT to_regclass('panal_migrations')") is None:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM panal_migrations"))


async def migrate(conn: asyncpg.Connection) -> tuple[int, list[Migration]]:
    """Apply the missing migrations in one transaction; (version before, migrations applied now).

    Under an advisory lock, so hubs that start together serialise here and the later ones find
    nothing left to do. A database newer than this code raises :class:`Unavailable`."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_LEDGER)
        before = await schema_version(conn)
        known = MIGRATIONS[-1].version
        if before > known:
            raise Unavailable(f"store: the database schema is at version {before}, newer than this panal "
                              f"understands (up to {known}): upgrade panal on this hub")
        applied = [m for m in MIGRATIONS if m.version > before]
        for step in applied:
            await conn.execute(step.sql)
            await conn.execute("INSERT INTO panal_migrations VALUES ($1, $2, $3)", step.version, step.name,
                               time.time())
    return before, applied


def describe_url(url: str) -> str:
    """host:port/database of a database URL, for messages (never its password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


async def migrate_database(url: str) -> list[str]:
    """``panal hub migrate`` for a PostgreSQL store: apply what is missing; lines that say what was done."""
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise Unavailable(f"store: cannot reach PostgreSQL at {describe_url(url)}: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        before, applied = await migrate(conn)
    finally:
        await conn.close()
    where = f"PostgreSQL database {describe_url(url)}"
    if not applied:
        return [f"{where}: schema up to date at version {before}"]
    return [f"{where}: applied migration {m.version}: {m.name}" for m in applied] + [
        f"{where}: schema now at version {applied[-1].version} (was {before})"]

