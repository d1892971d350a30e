"""SQLite (WAL) store with group commit: its rows here, its one writer (a thread; small writes inline when it
is idle; lease writes at the end of the loop's step) in hub/sqlite_writer.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from hub.blob_refs import manifest_blobs, result_blobs
from hub.records import AgentRow, HistoryBucket, JobRow, JobState, ResultRow, TaskRow
from hub.sqlite_rows import (
    JOB_COLS,
    TASK_COLS,
    create_schema,
    job_row,
    job_values,
    marks,
    pack,
    task_row,
    task_values,
    unpack,
    update_jobs,
    update_tasks,
)
from hub.sqlite_writer import CHECKPOINT_WAL_BYTES, INLINE_ROWS, SqliteWriter
from hub.store import LeaseWrite
from hub.tokens import AdmissionToken
from hub.trust.records import Ban, ReputationRow, TrustSnapshot, TrustWrite, ValidationRow

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

class SqliteStore:
    """The embedded default store. ``path`` is the database file (created if missing)."""

    def __init__(self, path: Path, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        # in WAL mode a NORMAL commit writes the log without an fsync (checkpoints fsync, on the writer thread);
        # FULL and EXTRA fsync at every COMMIT, which the event loop must never wait on
        self._writer = SqliteWriter(inline=self.synchronous not in ("FULL", "EXTRA", "2", "3"))

    @property
    def commits(self) -> int:
        return self._writer.commits

    # -- plumbing -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":   # a filesystem without shared memory, an in-memory database
            # outside WAL every COMMIT writes (and at synchronous=normal may sync) the database itself
            log.warning("store %s: journal mode is %s, not WAL: every write commits on the writer thread",
                        self.path, mode)
            self._writer.inline = False
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA wal_autocheckpoint=0")   # the writer thread checkpoints (hub/sqlite_writer.py) ...
        conn.execute(f"PRAGMA journal_size_limit={CHECKPOINT_WAL_BYTES}")   # ... when the log grows past this
        create_schema(conn)
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer.start(self._connect())

    async def close(self) -> None:
        await self._writer.stop()

    async def _run(self, fn: Callable[[sqlite3.Connection], T], inline: bool = False) -> T:
        return await self._writer.write(fn, inline)

    def _queue_write(self, fn: Callable[[sqlite3.Connection], T], inline: bool = False,
                     end_of_step: bool = False) -> asyncio.Future[T]:
        return self._writer.write(fn, inline, end_of_step)

    # -- agents and submitters ------------------------------------------------------------------
    async def upsert_agent(self, agent: AgentRow) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO agents (id, public_key, name, capabilities, registered_at, last_seen, owner) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "   # (never its key nor its owner)
                "name=excluded.name, capabilities=excluded.capabilities, last_seen=excluded.last_seen",
                (agent.id, agent.public_key, agent.name, json.dumps(agent.capabilities),
                 agent.registered_at, agent.last_seen, agent.owner))
        await self._run(op)

    async def list_agents(self) -> list[AgentRow]:
        def op(c: sqlite3.Connection) -> list[AgentRow]:
            rows = c.execute("SELECT id, public_key, name, capabilities, registered_at, last_seen, owner "
                             "FROM agents").fetchall()
            return [AgentRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]
        return await self._run(op)

    async def add_submitter(self, key_id: str, public_key: str, name: str) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO submitters VALUES (?,?,?,?) ON CONFLICT(id) DO UPDATE SET name=excluded.name",
            (key_id, public_key, name, time.time())))

    async def remove_submitter(self, key_id: str) -> bool:
        return await self._run(
            lambda c: c.execute("DELETE FROM submitters WHERE id=?", (key_id,)).rowcount > 0)

    async def list_submitters(self) -> list[tuple[str, str, str]]:
        return await self._run(lambda c: [tuple(r) for r in c.execute(
            "SELECT id, public_key, name FROM submitters ORDER BY added_at").fetchall()])

    # -- jobs, tasks, results -------------------------------------------------------------------
    async def create_job(self, job: JobRow, tasks: Sequence[TaskRow]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute(f"INSERT INTO jobs ({JOB_COLS}) VALUES ({marks(JOB_COLS)})", job_values(job))
            c.executemany(f"INSERT INTO tasks ({TASK_COLS}) VALUES ({marks(TASK_COLS)})",
                          [task_values(t) for t in tasks])
        await self._run(op, inline=len(tasks) <= INLINE_ROWS)

    def save_leases(self, leases: Sequence[LeaseWrite], started: Sequence[JobRow] = ()) -> asyncio.Future[None]:
        now = time.time()
        rows = [(lease, agent, attempt, expires, now, task) for task, lease, agent, attempt, expires in leases]

        def op(c: sqlite3.Connection) -> None:
            c.executemany("UPDATE tasks SET state='leased', lease_id=?, agent_id=?, attempt=?, lease_expires_at=?, "
                          "updated_at=? WHERE id=?", rows)
            update_jobs(c, started)
        return self._queue_write(op, inline=len(rows) + len(started) <= INLINE_ROWS, end_of_step=True)

    async def save_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow] = ()) -> None:
        def op(c: sqlite3.Connection) -> None:
            update_tasks(c, tasks)
            update_jobs(c, jobs)
        await self._run(op)

    async def accept_results(self, results: Sequence[ResultRow], tasks: Sequence[TaskRow],
                             jobs: Sequence[JobRow]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO results VALUES (?,?,?,?,?,?,?)",
                          [(r.task_id, r.job_id, r.attempt, r.agent_id, pack(r.record), r.digest,
                            r.accepted_at) for r in results])
            update_tasks(c, tasks)
            update_jobs(c, jobs)
        await self._run(op, inline=len(results) + len(tasks) <= INLINE_ROWS)

    async def load_active(self) -> tuple[list[JobRow], list[TaskRow]]:
        def op(c: sqlite3.Connection) -> tuple[list[JobRow], list[TaskRow]]:
            jobs = [job_row(r) for r in c.execute(
                f"SELECT {JOB_COLS} FROM jobs WHERE state IN ('queued','running')").fetchall()]
            tasks = [task_row(r) for r in c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE job_id IN "
                "(SELECT id FROM jobs WHERE state IN ('queued','running')) ORDER BY job_id, idx").fetchall()]
            return jobs, tasks
        return await self._run(op)

    async def list_jobs(self, state: JobState | None = None, limit: int = 1000) -> list[JobRow]:
        def op(c: sqlite3.Connection) -> list[JobRow]:
            if state is None:
                rows = c.execute(f"SELECT {JOB_COLS} FROM jobs ORDER BY created_at DESC LIMIT ?",
                                 (limit,)).fetchall()
            else:
                rows = c.execute(f"SELECT {JOB_COLS} FROM jobs WHERE state=? ORDER BY created_at DESC "
                                 "LIMIT ?", (state.value, limit)).fetchall()
            return [job_row(r) for r in rows]
        return await self._run(op)

    async def get_job(self, job_id: str) -> JobRow | None:
        def op(c: sqlite3.Connection) -> JobRow | None:
            row = c.execute(f"SELECT {JOB_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
            return job_row(row) if row else None
        return await self._run(op)

    async def get_tasks(self, job_id: str) -> list[TaskRow]:
        return await self._run(lambda c: [task_row(r) for r in c.execute(
            f"SELECT {TASK_COLS} FROM tasks WHERE job_id=? ORDER BY idx", (job_id,)).fetchall()])

    async def referenced_blobs(self) -> set[str]:
        """Every blob a job still needs: its inputs, its results' outputs, its tasks' checkpoints."""
        def op(c: sqlite3.Connection) -> set[str]:
            refs: set[str] = set()
            for (envelope,) in c.execute("SELECT envelope FROM jobs"):
                refs |= manifest_blobs(unpack(envelope))
            for (record,) in c.execute("SELECT record FROM results"):
                refs |= result_blobs(unpack(record))
            refs |= {r[0] for r in c.execute("SELECT checkpoint FROM tasks WHERE checkpoint IS NOT NULL")}
            return refs
        return await self._run(op)

    async def get_results(self, job_id: str) -> list[ResultRow]:
        return await self._run(lambda c: [
            ResultRow(r[0], r[1], r[2], r[3], unpack(r[4]), r[5], r[6]) for r in c.execute(
                "SELECT task_id, job_id, attempt, agent_id, record, digest, accepted_at FROM results "
                "WHERE job_id=? ORDER BY task_id", (job_id,)).fetchall()])

    # -- privacy and blob ownership (#16 parts 5-6) --------------------------------------------------
    async def list_submitter_jobs(self, submitter_id: str, state: JobState | None = None,
                                  limit: int = 1000) -> list[JobRow]:
        def op(c: sqlite3.Connection) -> list[JobRow]:
            where, args = ("submitter_id=?", [submitter_id]) if state is None else \
                ("submitter_id=? AND state=?", [submitter_id, state.value])
            return [job_row(r) for r in c.execute(f"SELECT {JOB_COLS} FROM jobs WHERE {where} "
                                               "ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()]
        return await self._run(op)

    async def record_blob_upload(self, sha256: str, key_id: str, size: int, at: float) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO blob_uploads (sha256, key_id, size, uploaded_at, claimed) VALUES (?, ?, ?, ?, 0) "
            "ON CONFLICT (sha256, key_id) DO UPDATE SET size=excluded.size, uploaded_at=excluded.uploaded_at, "
            "claimed=0", (sha256, key_id, size, at)))

    async def blob_uploaded_by(self, sha256: str, key_id: str) -> bool:
        return await self._run(lambda c: c.execute(
            "SELECT 1 FROM blob_uploads WHERE sha256=? AND key_id=?", (sha256, key_id)).fetchone() is not None)

    async def blob_usage(self, key_id: str) -> tuple[int, int]:
        def op(c: sqlite3.Connection) -> tuple[int, int]:
            size, count = c.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blob_uploads "
                                    "WHERE key_id=? AND claimed=0", (key_id,)).fetchone()
            return int(size), int(count)
        return await self._run(op)

    async def settle_blob_uploads(self, referenced: set[str], deleted: set[str]) -> None:
        def op(c: sqlite3.Connection) -> None:
            unclaimed = [r[0] for r in c.execute("SELECT DISTINCT sha256 FROM blob_uploads WHERE claimed=0")]
            c.executemany("UPDATE blob_uploads SET claimed=1 WHERE sha256=?",
                          [(s,) for s in unclaimed if s in referenced])
            c.executemany("DELETE FROM blob_uploads WHERE sha256=?", [(s,) for s in deleted])
        await self._run(op)

    async def submitter_references_blob(self, sha256: str, submitter_id: str) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            if c.execute("SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.checkpoint=? "
                         "AND j.submitter_id=? LIMIT 1", (sha256, submitter_id)).fetchone():
                return True
            # the stored records hold the name as plain text: SQLite's instr() finds candidates at C speed,
            # and only those are decoded to confirm (a name in a parameter is not an input)
            name = sha256.encode()
            for (envelope,) in c.execute("SELECT envelope FROM jobs WHERE submitter_id=? AND instr(envelope, ?)",
                                         (submitter_id, name)):
                if sha256 in manifest_blobs(unpack(envelope)):
                    return True
            # an output counts only if the result's agent uploaded it (else an agent could name anyone's blob
            # in a result and open it to its job's submitter); blobs from before uploads were recorded count
            for (record,) in c.execute(
                    "SELECT r.record FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.submitter_id=? "
                    "AND instr(r.record, ?) AND (EXISTS (SELECT 1 FROM blob_uploads u WHERE u.sha256=? "
                    "AND u.key_id=r.agent_id) OR NOT EXISTS (SELECT 1 FROM blob_uploads u WHERE u.sha256=?))",
                    (submitter_id, name, sha256, sha256)):
                if sha256 in result_blobs(unpack(record)):
                    return True
            return False
        return await self._run(op)
    # -- admission tokens (hub/tokens.py) ---------------------------------------------------------
    async def add_admission_token(self, token: AdmissionToken) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO admission_tokens (id, secret_hash, label, max_uses, uses, created_at, expires_at, "
            "revoked_at, owner) VALUES (?,?,?,?,?,?,?,?,?)",
            (token.id, token.secret_hash, token.label, token.max_uses, token.uses, token.created_at,
             token.expires_at, token.revoked_at, token.owner)))

    async def list_admission_tokens(self) -> list[AdmissionToken]:
        return await self._run(lambda c: [AdmissionToken(*r) for r in c.execute(
            "SELECT id, secret_hash, label, max_uses, uses, created_at, expires_at, revoked_at, owner "
            "FROM admission_tokens ORDER BY created_at, id").fetchall()])

    async def revoke_admission_token(self, token_id: str, at: float) -> bool:
        return await self._run(lambda c: c.execute(
            "UPDATE admission_tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
            (at, token_id)).rowcount > 0)

    async def use_admission_token(self, token_id: str, secret_hash: str, now: float) -> bool:
        return await self._run(lambda c: c.execute(
            "UPDATE admission_tokens SET uses=uses+1 WHERE id=? AND secret_hash=? AND revoked_at IS NULL "
            "AND expires_at>? AND (max_uses=0 OR uses<max_uses)", (token_id, secret_hash, now)).rowcount > 0)
    # -- result validation (hub/trust/) ---------------------------------------------------------
    async def add_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany(f"INSERT INTO tasks ({TASK_COLS}) VALUES ({marks(TASK_COLS)})",
                          [task_values(t) for t in tasks])
            c.executemany("UPDATE jobs SET n_tasks=? WHERE id=?", [(j.n_tasks, j.id) for j in jobs])
        await self._run(op)

    async def record_trust(self, write: TrustWrite) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO trust_validations VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(job_id, unit) DO UPDATE SET "
                "state=excluded.state, quorum=excluded.quorum, canonical_task=excluded.canonical_task, "
                "agents=excluded.agents, detail=excluded.detail, decided_at=excluded.decided_at",
                [(v.job_id, v.unit, v.state, v.quorum, v.canonical_task, json.dumps(v.agents), pack(v.detail),
                  v.decided_at) for v in write.validations])
            c.executemany(
                "INSERT INTO trust_reputation VALUES (?,?,?,?,?,?) ON CONFLICT(agent_id, kind) DO UPDATE SET "
                "consecutive_valid=excluded.consecutive_valid, valid=excluded.valid, invalid=excluded.invalid, "
                "updated_at=excluded.updated_at",
                [(r.agent_id, r.kind, r.consecutive_valid, r.valid, r.invalid, r.updated_at)
                 for r in write.reputation])
            c.executemany(
                "INSERT INTO trust_credit VALUES (?,?,?) ON CONFLICT(holder) DO UPDATE SET "
                "credit=credit+excluded.credit, results=results+excluded.results",
                [(g.holder, g.credit, g.results) for g in write.credit])
            c.executemany(
                "INSERT INTO trust_bans VALUES (?,?,?,?) ON CONFLICT(agent_id) DO UPDATE SET "
                "reason=excluded.reason, since=excluded.since, until=excluded.until",
                [(b.agent_id, b.reason, b.since, b.until) for b in write.bans])
        rows = len(write.validations) + len(write.reputation) + len(write.credit) + len(write.bans)
        # after a result's commit, while its submitter's reply goes out: committed as that step ends
        await self._queue_write(op, inline=rows <= INLINE_ROWS, end_of_step=True)

    async def load_trust(self) -> TrustSnapshot:
        def op(c: sqlite3.Connection) -> TrustSnapshot:
            return TrustSnapshot(
                reputation=[ReputationRow(*r) for r in c.execute(
                    "SELECT agent_id, kind, consecutive_valid, valid, invalid, updated_at FROM trust_reputation")],
                credit={r[0]: (r[1], r[2]) for r in c.execute("SELECT holder, credit, results FROM trust_credit")},
                bans=[Ban(*r) for r in c.execute("SELECT agent_id, reason, since, until FROM trust_bans")])
        return await self._run(op)

    async def get_validations(self, job_id: str) -> list[ValidationRow]:
        return await self._run(lambda c: [
            ValidationRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), unpack(r[6]), r[7]) for r in c.execute(
                "SELECT job_id, unit, state, quorum, canonical_task, agents, detail, decided_at "
                "FROM trust_validations WHERE job_id=? ORDER BY unit", (job_id,)).fetchall()])

    # -- the status page's history (hub/status_history.py) ----------------------------------------------
    async def save_status_history(self, buckets: Sequence[HistoryBucket], keep_since: float) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR REPLACE INTO status_history (start, done, failed, agents, backlog) "
                          "VALUES (?,?,?,?,?)", [(b.start, b.done, b.failed, b.agents, b.backlog) for b in buckets])
            c.execute("DELETE FROM status_history WHERE start<?", (keep_since,))
        await self._run(op)

    async def load_status_history(self, since: float) -> list[HistoryBucket]:
        return await self._run(lambda c: [HistoryBucket(*r) for r in c.execute(
            "SELECT start, done, failed, agents, backlog FROM status_history WHERE start>=? ORDER BY start",
            (since,)).fetchall()])
