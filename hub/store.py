"""The narrow interface every board store implements (SQLite now; PostgreSQL later).

The board keeps live scheduling state in memory and writes through to the store; a write is
acknowledged to a client only after the store has committed it, so nothing acknowledged is lost
when the board is killed. Stores are chosen by URL (hub/stores.py) and held to one contract
suite (tests/test_store_contract.py); every write below is atomic: all of it or none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

from hub.records import AgentRow, HistoryBucket, JobRow, JobState, ResultRow, TaskRow
from hub.tokens import AdmissionToken
from hub.trust.records import TrustSnapshot, TrustWrite, ValidationRow

__all__ = ["LeaseWrite", "Store"]

# (task_id, lease_id, agent_id, attempt, lease_expires_at)
LeaseWrite = tuple[str, str, str, int, float]


class Store(Protocol):
    async def open(self) -> None:
        """Connect, creating the schema if missing; state written before a close or crash is back."""
    async def close(self) -> None:
        """Finish the writes already queued, then disconnect."""

    async def upsert_agent(self, agent: AgentRow) -> None:
        """Add an agent, or update its name, capabilities and last_seen (never its key)."""
    async def list_agents(self) -> list[AgentRow]: ...
    async def add_submitter(self, key_id: str, public_key: str, name: str) -> None:
        """Authorise a key; re-adding one renames it."""
    async def remove_submitter(self, key_id: str) -> bool:
        """Revoke a key; False if it was not there."""
    async def list_submitters(self) -> list[tuple[str, str, str]]:
        """(key id, public key, name), oldest first."""

    async def create_job(self, job: JobRow, tasks: Sequence[TaskRow]) -> None:
        """Insert a job with all its tasks; an existing job id is an error and changes nothing."""
    def save_leases(self, leases: Sequence[LeaseWrite], started: Sequence[JobRow] = ()) -> Awaitable[None]:
        """Mark tasks leased to an agent until lease_expires_at, and the jobs they start as ``started`` says
        (their state), in one write. Queued when called, not when awaited: a lease reply sent before it lands
        still comes after it in the store's order, before any write queued later (hub/lease_writes.py)."""
    async def save_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow] = ()) -> None:
        """Write tasks' mutable fields (state, attempt, lease, error, progress, checkpoint) and jobs'
        state, finished_at, error and best task (hub/best.py)."""
    async def accept_results(self, results: Sequence[ResultRow], tasks: Sequence[TaskRow],
                             jobs: Sequence[JobRow]) -> None:
        """Record results with their tasks' and jobs' new state; a second result for a task is an
        error and changes nothing (exactly one accepted result per task)."""

    async def load_active(self) -> tuple[list[JobRow], list[TaskRow]]:
        """Queued and running jobs with all their tasks (ordered by job, index): a restart's state."""
    async def list_jobs(self, state: JobState | None = None, limit: int = 1000) -> list[JobRow]:
        """Jobs, newest first, optionally in one state."""
    async def get_job(self, job_id: str) -> JobRow | None: ...
    async def get_tasks(self, job_id: str) -> list[TaskRow]:
        """A job's tasks by index."""
    async def get_results(self, job_id: str) -> list[ResultRow]:
        """A job's accepted results by task id (their digests recognise a re-sent result)."""
    async def referenced_blobs(self) -> set[str]:
        """Every blob a job still needs: inputs, outputs, checkpoints (hub/blob_refs.py)."""

    # -- privacy and blob ownership (#16 parts 5-6) --------------------------------------------------
    async def list_submitter_jobs(self, submitter_id: str, state: JobState | None = None,
                                  limit: int = 1000) -> list[JobRow]:
        """One submitter's jobs, newest first, optionally in one state."""
    async def record_blob_upload(self, sha256: str, key_id: str, size: int, at: float) -> None:
        """Note that ``key_id`` uploaded (proved it holds) blob ``sha256``; again: refresh it, unclaimed."""
    async def blob_uploaded_by(self, sha256: str, key_id: str) -> bool:
        """Whether ``key_id`` has uploaded blob ``sha256`` (and it was not collected since)."""
    async def blob_usage(self, key_id: str) -> tuple[int, int]:
        """(bytes, count) of the key's uploads that no job or result has claimed yet: its quota use."""
    async def settle_blob_uploads(self, referenced: set[str], deleted: set[str]) -> None:
        """After a blob GC round: uploads now referenced are claimed (off quota), collected ones forgotten."""
    async def submitter_references_blob(self, sha256: str, submitter_id: str) -> bool:
        """Whether a job of ``submitter_id`` names the blob: an input, a checkpoint, or a result's output
        that the result's agent uploaded (or that nobody is recorded as uploading: older blobs)."""
    # -- admission tokens (hub/tokens.py; `panal hub tokens ...`) --------------------------------
    async def add_admission_token(self, token: AdmissionToken) -> None:
        """Store a new token (its id is fresh; a duplicate id is an error and changes nothing)."""
    async def list_admission_tokens(self) -> list[AdmissionToken]:
        """Every token, revoked and expired ones too, oldest first."""
    async def revoke_admission_token(self, token_id: str, at: float) -> bool:
        """Revoke a token; False if there is no such token or it was already revoked."""
    async def use_admission_token(self, token_id: str, secret_hash: str, now: float) -> bool:
        """Count one use, atomically, only if the token exists with this secret, is not revoked,
        not expired at ``now`` and not used up; True if it was counted. Two concurrent last uses of a
        single-use token: exactly one is True."""
    # -- result validation (hub/trust/) ---------------------------------------------------------
    async def add_tasks(self, tasks: Sequence[TaskRow], jobs: Sequence[JobRow]) -> None:
        """Insert more instance rows of existing jobs and write those jobs' new ``n_tasks``."""
    async def record_trust(self, write: TrustWrite) -> None:
        """Upsert validation records, reputation rows and bans; add credit grants to the holders' totals."""
    async def load_trust(self) -> TrustSnapshot:
        """Every reputation row, credit total and ban (a restart's trust state)."""
    async def get_validations(self, job_id: str) -> list[ValidationRow]:
        """A job's validation records by unit."""
    # -- the status page's history (hub/status_history.py) ------------------------------------------
    async def save_status_history(self, buckets: Sequence[HistoryBucket], keep_since: float) -> None:
        """Write the buckets (a bucket with the same ``start`` is replaced) and drop every bucket that
        starts before ``keep_since``, in one commit."""
    async def load_status_history(self, since: float) -> list[HistoryBucket]:
        """The buckets that start at or after ``since``, oldest first."""
