"""Who may upload how much, and who may read which blob (#16 part 5).

Blobs are named by their SHA-256, and a hash is not a secret: it is in manifests, results and logs. So
knowing a name grants nothing. A key may read a blob when

- it uploaded it (it proved it holds the bytes; the store keeps who uploaded what),
- it is the submitter of a job that names it (an input, a result's output, a task's checkpoint),
- it is an agent whose current lease names it (its task's inputs, of an input split in shard blobs only
  its task's shard, or the checkpoint it resumes from),
- or it is an admin key (hub.yaml ``admins``).

Anyone else gets the same 404 as for a blob the board does not have: existence is not revealed. A job may
name as an input only a blob its submitter uploaded (or one its earlier jobs already name), so a stranger
cannot gain access to a hash by submitting a job that names it; an agent's heartbeat may name as a
checkpoint only a blob it uploaded.

Quotas: per key, what it uploaded that no job or result names yet (``blob_quota_bytes_per_key``,
``blob_quota_count_per_key``), counted in the store and settled by each GC round. Honest use (upload,
then submit) leaves the quota at once; junk uploads fill it and are collected after the grace period.
"""

from __future__ import annotations

import time
from collections import Counter

from hub.blob_refs import manifest_blobs, task_blobs
from hub.board import Board
from hub.config import HubConfig
from security.errors import BadRequest, PanalError

__all__ = ["BlobAccess", "LengthRequired", "QuotaExceeded"]


class QuotaExceeded(PanalError):
    """A key's blob quota is used up (429: it frees itself as jobs claim uploads or GC collects them)."""

    status = 429
    code = "blob_quota_exceeded"


class LengthRequired(PanalError):
    """An upload without Content-Length: with per-key byte quotas the size must be declared up front (a
    chunked upload counted as 0 bytes let one key hold any number of 4 GiB uploads in flight)."""

    status = 411
    code = "length_required"


class BlobAccess:
    """The blob routes' policy over one board: quotas on PUT, reading rights on GET/HEAD."""

    def __init__(self, board: Board, config: HubConfig) -> None:
        self.board, self.config = board, config
        self._uploading: Counter[str] = Counter()   # key id -> bytes declared by its uploads in flight
        self._uploads: Counter[str] = Counter()     # key id -> its uploads in flight

    def is_admin(self, key_id: str) -> bool:
        return key_id in self.config.admins

    async def begin_upload(self, key_id: str, declared: int | None) -> None:
        """Refuse an upload past the key's quota (with its uploads in flight); else count it in flight."""
        config = self.config
        if declared is None and config.blob_quota_bytes_per_key:
            raise LengthRequired("a blob upload must declare its size (Content-Length): this board has a "
                                 "per-key byte quota (blob_quota_bytes_per_key)")
        used_bytes, used_count = await self.board.store.blob_usage(key_id)
        used_bytes += self._uploading[key_id]
        used_count += self._uploads[key_id]
        size = declared or 0
        quota = None
        if config.blob_quota_count_per_key and used_count + 1 > config.blob_quota_count_per_key:
            quota = (f"blob_quota_count_per_key is {config.blob_quota_count_per_key} blobs and key {key_id} "
                     f"already has {used_count} that no job refers to")
        elif config.blob_quota_bytes_per_key and used_bytes + size > config.blob_quota_bytes_per_key:
            quota = (f"blob_quota_bytes_per_key is {config.blob_quota_bytes_per_key} bytes and key {key_id} "
                     f"already has {used_bytes} bytes that no job refers to (this upload: {size})")
        if quota is not None:
            raise QuotaExceeded(f"blob quota exceeded: {quota}; submit the jobs that use them, or wait "
                                f"{config.blob_gc_grace_s:.0f} s for unused uploads to be collected",
                                details={"quota_bytes": config.blob_quota_bytes_per_key,
                                         "quota_count": config.blob_quota_count_per_key,
                                         "used_bytes": used_bytes, "used_count": used_count})
        self._uploading[key_id] += size
        self._uploads[key_id] += 1

    def end_upload(self, key_id: str, declared: int | None) -> None:
        self._uploading[key_id] -= declared or 0
        self._uploads[key_id] -= 1
        if self._uploads[key_id] <= 0:
            del self._uploads[key_id]
            self._uploading.pop(key_id, None)

    async def uploaded(self, key_id: str, sha: str, size: int) -> None:
        await self.board.store.record_blob_upload(sha, key_id, size, time.time())

    async def may_read(self, key_id: str, sha: str) -> bool:
        if self.is_admin(key_id) or sha in self.leased_blobs(key_id):
            return True
        store = self.board.store
        if await store.blob_uploaded_by(sha, key_id):
            return True
        return await store.submitter_references_blob(sha, key_id)

    def leased_blobs(self, agent_id: str) -> set[str]:
        """Every blob the agent's current leases name: their tasks' inputs and checkpoints."""
        agent = self.board.view.agents.get(agent_id)
        found: set[str] = set()
        for task_id in list(agent.running) if agent is not None else []:
            task = self.board.view.task(task_id)
            job = self.board.view.job(task.job_id) if task is not None else None
            if task is None or job is None:
                continue
            found |= task_blobs(job.envelope, task.params)   # of a split input, only the task's shard
            if task.checkpoint:
                found.add(task.checkpoint)
        return found

    async def check_inputs(self, envelope: object, submitter_id: str) -> None:
        """A job may name only inputs its submitter uploaded (or already uses): the same error as a blob
        that is not on the board, so that it does not tell whether someone else's blob exists."""
        store = self.board.store
        for sha in sorted(manifest_blobs(envelope)):
            if self.is_admin(submitter_id) or await store.blob_uploaded_by(sha, submitter_id) \
                    or await store.submitter_references_blob(sha, submitter_id):
                continue
            raise BadRequest(f"spec.inputs: blob {sha} is not on this board; upload it first "
                             "(PUT /v1/blobs/{sha256})", code="missing_blob")

    async def own_checkpoint(self, agent_id: str, sha: str) -> bool:
        """Whether an agent may name ``sha`` as its task's checkpoint: only a blob it uploaded itself."""
        return await self.board.store.blob_uploaded_by(sha, agent_id)
