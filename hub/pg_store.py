"""PostgreSQL store (``store: postgresql://...``): the board's state in a database several hubs share.

Every write goes through the group-committing writer of hub/pg_commit.py (acknowledged only once
committed; one transaction for the writes that queued up meanwhile); reads use its pool. The schema
is migrated at open (hub/pg_schema.py); rows use the codecs shared with SQLite (hub/store_rows.py).
Methods mirror hub/sqlite_store.py statement for statement, in PostgreSQL's dialect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from asyncpg import Record

from hub.blob_refs import manifest_blobs, result_blobs
from hub.pg_commit import Conn, PgConnections, Reader
from hub.pg_schema import migrate
from hub.records import AgentRow, HistoryBucket, JobRow, JobState, ResultRow, TaskRow
from hub.store import LeaseWrite
from hub.store_rows import (
    AGENT_COLS,
    JOB_COLS,
    TASK_COLS,
    agent_row,
    agent_values,
    job_row,
    job_update_values,
    job_values,
    pack,
    task_row,
    task_update_values,
    task_values,
    unpack,
)
from hub.tokens import AdmissionToken
from hub.trust.records import Ban, ReputationRow, TrustSnapshot, TrustWrite, ValidationRow

__all__ = ["PgStore"]

T = TypeVar("T")


def _params(columns: str) -> str:
    return ",".join(f"${i}" for i in range(1, len(columns.split(",")) + 1))


_INSERT_TASK = f"INSERT INTO tasks ({TASK_COLS}) VALUES ({_params(TASK_COLS)})"
#: a job and all its tasks in one statement (the tasks as arrays, $20 on): one round trip per submission
_CREATE_JOB = (f"WITH job_in AS (INSERT INTO jobs ({JOB_COLS}) VALUES ({_params(JOB_COLS)}) RETURNING 1) "
               f"INSERT INTO tasks ({TASK_COLS}) SELECT * FROM unnest($20::text[], $21::text[], $22::int[], "
               "$23::bytea[], $24::text[], $25::int[], $26::text[], $27::text[], $28::float8[], $29::text[], "
               "$30::text[], $31::float8[], $32::float8[], $33::text[], $34::bytea[], $35::int[])")
# A task batch's and its jobs' new state (and its results) as ONE statement over arrays (unnest): one round
# trip and, alone in a batch, no BEGIN/COMMIT; data-modifying CTEs make it all-or-nothing like a transaction.
_SET_TASKS = ("tasks_set AS (UPDATE tasks SET state=v.state, attempt=v.attempt, lease_id=v.lease_id, "
              "agent_id=v.agent_id, lease_expires_at=v.lease_expires_at, error=v.error, error_class=v.error_class, "
              "progress=v.progress, updated_at=v.updated_at, checkpoint=v.checkpoint, "
              "checkpoint_record=v.checkpoint_record FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], "
              "$5::float8[], $6::text[], $7::text[], $8::float8[], $9::float8[], $10::text[], $11::bytea[], "
              "$12::text[]) AS v(state, attempt, lease_id, agent_id, lease_expires_at, error, error_class, progress, "
              "updated_at, checkpoint, checkpoint_record, id) WHERE tasks.id = v.id RETURNING 1)")
_SET_JOBS = ("UPDATE jobs SET state=w.state, finished_at=w.finished_at, error=w.error, best=w.best "
             "FROM unnest($13::text[], $14::float8[], $15::text[], $16::text[], $17::text[]) "
             "AS w(state, finished_at, error, best, id) WHERE jobs.id = w.id")
_UPDATE = f"WITH {_SET_TASKS} {_SET_JOBS}"
_ACCEPT = (f"WITH results_in AS (INSERT INTO results (task_id, job_id, attempt, agent_id, record, digest, "
           "accepted_at) SELECT * FROM unnest($18::text[], $19::text[], $20::int[], $21::text[], $22::bytea[], "
           f"$23::text[], $24::float8[]) RETURNING 1), {_SET_TASKS} {_SET_JOBS}")


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as per-column lists (the arrays unnest() turns back into rows)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _count(status: str) -> int:
    """Rows touched, from a command status such as ``UPDATE 1``."""
    return int(status.rsplit(" ", 1)[-1])


class PgStore:
    """A board store in a PostgreSQL database (``url`` as libpq spells it; created by the operator)."""

    def __init__(self, url: str, *, readers: int = 4) -> None:
        self.url = url
        self.db = PgConnections(url, readers)   # the writer (group commit) and the readers: hub/pg_commit.py
        self.applied: list[int] = []           # migrations this open applied (hub/pg_schema.py)

    @property
    def commits(self) -> int:
        """Transactions committed so far (fewer than writes acknowledged: group commit)."""
        return self.db.commits

    async def open(self) -> None:
        async def prepare(conn: Conn) -> None:
            _, applied = await migrate(conn)
            self.applied = [m.version for m in applied]
        await self.db.open(prepare)

    async def close(self) -> None:
        await self.db.close()

    def _run(self, fn: Callable[[Conn], Awaitable[T]], one_statement: bool = False) -> Awaitable[T]:
        return self.db.write(fn, one_statement=one_statement)

    def _read(self, fn: Callable[[Reader], Awaitable[T]]) -> Awaitable[T]:
        return self.db.read(fn)

    async def _fetch(self, sql: str, *args: object) -> list[Record]:
        return await self.db.read(lambda c: c.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: object) -> Record | None:
        return await self.db.read(lambda c: c.fetchrow(sql, *args))

    async def _fetchval(self, sql: str, *args: object) -> object:
        return await self.db.read(lambda c: c.fetchval(sql, *args))

    # -- agents and submitters ------------------------------------------------------------------
    async def upsert_agent(self, agent: AgentRow) -> None:
        await self._run(lambda c: c.execute(
            f"INSERT INTO agents ({AGENT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (id) DO UPDATE SET "
            "name=EXCLUDED.name, capabilities=EXCLUDED.capabilities, last_seen=EXCLUDED.last_seen",
            *agent_values(agent)), one_statement=True)    # (never its key nor its owner)

    async def list_agents(self) -> list[AgentRow]:
        return [agent_row(r) for r in await self._fetch(f"SELECT {AGENT_COLS} FROM agents ORDER BY id")]

    async def add_submitter(self, key_id: str, public_key: str, name: str) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO submitters (id, public_key, name, added_at) VALUES ($1,$2,$3,$4) "
            "ON CONFLICT (id) DO UPDATE SET name=EXCLUDED.name", key_id, public_key, name, time.time()),
            one_statement=True)

    async def remove_submitter(self, key_id: str) -> bool:
        return await self._run(
            lambda c: _rows(c.execute("DELETE FROM submitters WHERE id=$1", key_id)), one_statement=True) > 0

    async def list_submitters(self) -> list[tuple[str, str, str]]:
        return [(r[0], r[1], r[2]) for r in await self._fetch(
            "SELECT id, public_key, name FROM submitters ORDER BY added_at, seq")]

    # -- jobs, tasks, results -------------------------------------------------------------------
    async def create_job(self, job: JobRow, tasks: Sequence[TaskRow]) -> None:
        args = [*job_values(job), *_columns([task_values(t) for t in tasks], 16)]
        await self._run(lambda c: c.execute(_CREATE_JOB, *args), one_statement=True)

    def save_leases(self, leases: Sequence[LeaseWrite], started: Sequence[JobRow] = ()) -> asyncio.Future[None]:
        now = time.time()
        rows = [(lease, agent, attempt, expires, now, task) for task, lease, agent, attempt, expires in leases]
        sql = ("UPDATE tasks SET state='leased', lease_id=$1, agent_id=$2, attempt=$3, lease_expires_at=$4, "
               "updated_at=$5 WHERE id=$6")
        if not started:
            return self.db.queue(lambda c: c.executemany(sql, rows), one_statement=True)
        jobs = _update_args([], started)

        async def op(c: Conn) -> None:
            await c.executemany(sql, rows)
            await c.execute(_UPDATE, *jobs)
        return self.db.queue(op)

    async def save_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow] = ()) -> None:
        args = _update_args(tasks, jobs)
        await self._run(lambda c: c.execute(_UPDATE, *args), one_statement=True)

    async def accept_results(self, results: Sequence[ResultRow], tasks: Sequence[TaskRow],
                             jobs: Sequence[JobRow]) -> None:
        args = _update_args(tasks, jobs) + _columns(
            [(r.task_id, r.job_id, r.attempt, r.agent_id, pack(r.record), r.digest, r.accepted_at) for r in results], 7)
        await self._run(lambda c: c.execute(_ACCEPT, *args), one_statement=True)

    async def load_active(self) -> tuple[list[JobRow], list[TaskRow]]:
        async def op(c: Reader) -> tuple[list[JobRow], list[TaskRow]]:
            async with c.transaction(isolation="repeatable_read", readonly=True):   # one snapshot
                jobs = [job_row(r) for r in await c.fetch(
                    f"SELECT {JOB_COLS} FROM jobs WHERE state IN ('queued','running') ORDER BY created_at, id")]
                tasks = [task_row(r) for r in await c.fetch(
                    f"SELECT {TASK_COLS} FROM tasks WHERE job_id IN "
                    "(SELECT id FROM jobs WHERE state IN ('queued','running')) ORDER BY job_id, idx")]
            return jobs, tasks
        return await self._read(op)

    async def list_jobs(self, state: JobState | None = None, limit: int = 1000) -> list[JobRow]:
        if state is None:
            rows = await self._fetch(f"SELECT {JOB_COLS} FROM jobs ORDER BY created_at DESC LIMIT $1", limit)
        else:
            rows = await self._fetch(f"SELECT {JOB_COLS} FROM jobs WHERE state=$1 ORDER BY created_at DESC "
                                         "LIMIT $2", state.value, limit)
        return [job_row(r) for r in rows]

    async def get_job(self, job_id: str) -> JobRow | None:
        row = await self._fetchrow(f"SELECT {JOB_COLS} FROM jobs WHERE id=$1", job_id)
        return job_row(row) if row else None

    async def get_tasks(self, job_id: str) -> list[TaskRow]:
        return [task_row(r) for r in await self._fetch(
            f"SELECT {TASK_COLS} FROM tasks WHERE job_id=$1 ORDER BY idx", job_id)]

    async def referenced_blobs(self) -> set[str]:
        """Every blob a job still needs: its inputs, its results' outputs, its tasks' checkpoints."""
        async def op(c: Reader) -> set[str]:
            refs: set[str] = set()
            async with c.transaction(isolation="repeatable_read", readonly=True):
                for r in await c.fetch("SELECT envelope FROM jobs"):
                    refs |= manifest_blobs(unpack(r[0]))
                for r in await c.fetch("SELECT record FROM results"):
                    refs |= result_blobs(unpack(r[0]))
                refs |= {r[0] for r in await c.fetch("SELECT checkpoint FROM tasks WHERE checkpoint IS NOT NULL")}
            return refs
        return await self._read(op)

    async def get_results(self, job_id: str) -> list[ResultRow]:
        return [ResultRow(r[0], r[1], r[2], r[3], unpack(r[4]), r[5], r[6]) for r in await self._fetch(
            "SELECT task_id, job_id, attempt, agent_id, record, digest, accepted_at FROM results "
            "WHERE job_id=$1 ORDER BY task_id", job_id)]

    # -- privacy and blob ownership (#16 parts 5-6) --------------------------------------------------
    async def list_submitter_jobs(self, submitter_id: str, state: JobState | None = None,
                                  limit: int = 1000) -> list[JobRow]:
        if state is None:
            rows = await self._fetch(f"SELECT {JOB_COLS} FROM jobs WHERE submitter_id=$1 "
                                         "ORDER BY created_at DESC LIMIT $2", submitter_id, limit)
        else:
            rows = await self._fetch(f"SELECT {JOB_COLS} FROM jobs WHERE submitter_id=$1 AND state=$2 "
                                         "ORDER BY created_at DESC LIMIT $3", submitter_id, state.value, limit)
        return [job_row(r) for r in rows]

    async def record_blob_upload(self, sha256: str, key_id: str, size: int, at: float) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO blob_uploads (sha256, key_id, size, uploaded_at, claimed) VALUES ($1,$2,$3,$4,0) "
            "ON CONFLICT (sha256, key_id) DO UPDATE SET size=EXCLUDED.size, uploaded_at=EXCLUDED.uploaded_at, "
            "claimed=0", sha256, key_id, size, at), one_statement=True)

    async def blob_uploaded_by(self, sha256: str, key_id: str) -> bool:
        return await self._fetchval(
            "SELECT 1 FROM blob_uploads WHERE sha256=$1 AND key_id=$2", sha256, key_id) is not None

    async def blob_usage(self, key_id: str) -> tuple[int, int]:
        row = await self._fetchrow("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blob_uploads "
                                       "WHERE key_id=$1 AND claimed=0", key_id)
        assert row is not None
        return int(row[0]), int(row[1])

    async def settle_blob_uploads(self, referenced: set[str], deleted: set[str]) -> None:
        async def op(c: Conn) -> None:
            unclaimed = [r[0] for r in await c.fetch("SELECT DISTINCT sha256 FROM blob_uploads WHERE claimed=0")]
            await c.execute("UPDATE blob_uploads SET claimed=1 WHERE sha256 = ANY($1::text[])",
                            [s for s in unclaimed if s in referenced])
            await c.execute("DELETE FROM blob_uploads WHERE sha256 = ANY($1::text[])", list(deleted))
        await self._run(op)

    async def submitter_references_blob(self, sha256: str, submitter_id: str) -> bool:
        async def op(c: Reader) -> bool:
            if await c.fetchval("SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.checkpoint=$1 "
                                "AND j.submitter_id=$2 LIMIT 1", sha256, submitter_id):
                return True
            # the stored records hold the name as plain bytes: position() finds candidates in the server,
            # and only those are decoded to confirm (a name in a parameter is not an input)
            name = sha256.encode()
            for r in await c.fetch("SELECT envelope FROM jobs WHERE submitter_id=$1 AND position($2 in envelope) > 0",
                                   submitter_id, name):
                if sha256 in manifest_blobs(unpack(r[0])):
                    return True
            # an output counts only if the result's agent uploaded it (else an agent could name anyone's blob
            # in a result and open it to its job's submitter); blobs from before uploads were recorded count
            for r in await c.fetch(
                    "SELECT r.record FROM results r JOIN jobs j ON j.id = r.job_id WHERE j.submitter_id=$1 "
                    "AND position($2 in r.record) > 0 AND (EXISTS (SELECT 1 FROM blob_uploads u WHERE u.sha256=$3 "
                    "AND u.key_id=r.agent_id) OR NOT EXISTS (SELECT 1 FROM blob_uploads u WHERE u.sha256=$3))",
                    submitter_id, name, sha256):
                if sha256 in result_blobs(unpack(r[0])):
                    return True
            return False
        return await self._read(op)

    # -- admission tokens (hub/tokens.py) ---------------------------------------------------------
    async def add_admission_token(self, token: AdmissionToken) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO admission_tokens (id, secret_hash, label, max_uses, uses, created_at, expires_at, "
            "revoked_at, owner) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
            token.id, token.secret_hash, token.label, token.max_uses, token.uses, token.created_at,
            token.expires_at, token.revoked_at, token.owner), one_statement=True)

    async def list_admission_tokens(self) -> list[AdmissionToken]:
        return [AdmissionToken(*r) for r in await self._fetch(
            "SELECT id, secret_hash, label, max_uses, uses, created_at, expires_at, revoked_at, owner "
            "FROM admission_tokens ORDER BY created_at, id")]

    async def revoke_admission_token(self, token_id: str, at: float) -> bool:
        return await self._run(lambda c: _rows(c.execute(
            "UPDATE admission_tokens SET revoked_at=$1 WHERE id=$2 AND revoked_at IS NULL", at, token_id)),
            one_statement=True) > 0

    async def use_admission_token(self, token_id: str, secret_hash: str, now: float) -> bool:
        return await self._run(lambda c: _rows(c.execute(
            "UPDATE admission_tokens SET uses=uses+1 WHERE id=$1 AND secret_hash=$2 AND revoked_at IS NULL "
            "AND expires_at>$3 AND (max_uses=0 OR uses<max_uses)", token_id, secret_hash, now)),
            one_statement=True) > 0

    # -- result validation (hub/trust/) ---------------------------------------------------------
    async def add_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow]) -> None:
        async def op(c: Conn) -> None:
            await c.executemany(_INSERT_TASK, [task_values(t) for t in tasks])
            await c.executemany("UPDATE jobs SET n_tasks=$1 WHERE id=$2", [(j.n_tasks, j.id) for j in jobs])
        await self._run(op)

    async def record_trust(self, write: TrustWrite) -> None:
        async def op(c: Conn) -> None:
            await c.executemany(
                "INSERT INTO trust_validations VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (job_id, unit) "
                "DO UPDATE SET state=EXCLUDED.state, quorum=EXCLUDED.quorum, canonical_task=EXCLUDED.canonical_task,"
                " agents=EXCLUDED.agents, detail=EXCLUDED.detail, decided_at=EXCLUDED.decided_at",
                [(v.job_id, v.unit, v.state, v.quorum, v.canonical_task, json.dumps(v.agents), pack(v.detail),
                  v.decided_at) for v in write.validations])
            await c.executemany(
                "INSERT INTO trust_reputation VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (agent_id, kind) DO UPDATE "
                "SET consecutive_valid=EXCLUDED.consecutive_valid, valid=EXCLUDED.valid, "
                "invalid=EXCLUDED.invalid, updated_at=EXCLUDED.updated_at",
                [(r.agent_id, r.kind, r.consecutive_valid, r.valid, r.invalid, r.updated_at)
                 for r in write.reputation])
            await c.executemany(
                "INSERT INTO trust_credit VALUES ($1,$2,$3) ON CONFLICT (holder) DO UPDATE SET "
                "credit=trust_credit.credit+EXCLUDED.credit, results=trust_credit.results+EXCLUDED.results",
                [(g.holder, g.credit, g.results) for g in write.credit])
            await c.executemany(
                "INSERT INTO trust_bans VALUES ($1,$2,$3,$4) ON CONFLICT (agent_id) DO UPDATE SET "
                "reason=EXCLUDED.reason, since=EXCLUDED.since, until=EXCLUDED.until",
                [(b.agent_id, b.reason, b.since, b.until) for b in write.bans])
        await self._run(op)

    async def load_trust(self) -> TrustSnapshot:
        async def op(c: Reader) -> TrustSnapshot:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                return TrustSnapshot(
                    reputation=[ReputationRow(*r) for r in await c.fetch(
                        "SELECT agent_id, kind, consecutive_valid, valid, invalid, updated_at FROM trust_reputation")],
                    credit={r[0]: (r[1], r[2]) for r in await c.fetch(
                        "SELECT holder, credit, results FROM trust_credit")},
                    bans=[Ban(*r) for r in await c.fetch("SELECT agent_id, reason, since, until FROM trust_bans")])
        return await self._read(op)

    async def get_validations(self, job_id: str) -> list[ValidationRow]:
        return [ValidationRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), unpack(r[6]), r[7])
                for r in await self._fetch(
                    "SELECT job_id, unit, state, quorum, canonical_task, agents, detail, decided_at "
                    "FROM trust_validations WHERE job_id=$1 ORDER BY unit", job_id)]

    # -- the status page's history (hub/status_history.py) ----------------------------------------------
    async def save_status_history(self, buckets: Sequence[HistoryBucket], keep_since: float) -> None:
        async def op(c: Conn) -> None:
            await c.executemany(
                "INSERT INTO status_history (start, done, failed, agents, backlog) VALUES ($1,$2,$3,$4,$5) "
                "ON CONFLICT (start) DO UPDATE SET done=EXCLUDED.done, failed=EXCLUDED.failed, "
                "agents=EXCLUDED.agents, backlog=EXCLUDED.backlog",
                [(b.start, b.done, b.failed, b.agents, b.backlog) for b in buckets])
            await c.execute("DELETE FROM status_history WHERE start < $1", keep_since)
        await self._run(op)

    async def load_status_history(self, since: float) -> list[HistoryBucket]:
        return [HistoryBucket(*r) for r in await self._fetch(
            "SELECT start, done, failed, agents, backlog FROM status_history WHERE start >= $1 ORDER BY start",
            since)]


async def _rows(status: Awaitable[str]) -> int:
    return _count(await status)


def _update_args(tasks: Sequence[TaskRow], jobs: Sequence[JobRow]) -> list[list[Any]]:
    """The arrays of _SET_TASKS and _SET_JOBS. A row named twice is written once, as its last version
    (one UPDATE touches a row once; executemany would have written both, the last one winning)."""
    last_tasks = {t.id: t for t in tasks}.values()
    last_jobs = {j.id: j for j in jobs}.values()
    return (_columns([task_update_values(t) for t in last_tasks], 12)
            + _columns([job_update_values(j) for j in last_jobs], 5))
