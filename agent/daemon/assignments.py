"""Checking a leased task against its submitter's signed manifest before running it.

The board relays work; the agent does not have to trust it for *what* to run. The envelope's
signature must verify, and the task's kind and parameters must be exactly what that manifest
expands to at the task's index. A board that alters parameters gets its task refused.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from jobs.inputs import shard_points
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from security.errors import BadRequest, Forbidden, PanalError

__all__ = ["AGENT_MAX_TASKS", "ManifestCache"]

#: the most tasks a manifest may expand to for this agent to run it: a board sets its own cap
#: (``max_tasks_per_job``, 10,000 by default; a fleet raises it), and the agent never expands a manifest,
#: it computes the one unit an assignment names (``Manifest.point``), so its bound can be generous
AGENT_MAX_TASKS = 100_000_000
#: the envelope bytes the cache keeps at most (besides at most ``size`` entries): a lying board sending
#: 16 MiB manifests must not make the agent hold 64 of them
MAX_CACHED_BYTES = 64 * 1024 * 1024


class ManifestCache:
    """Verified manifests (and their shards) by envelope, bounded in entries and in bytes."""

    def __init__(self, size: int = 64, max_bytes: int = MAX_CACHED_BYTES) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._cache: OrderedDict[str, tuple[str, Manifest, list[dict[str, int]], int]] = OrderedDict()
        self._bytes = 0

    def check(self, assignment: Assignment, trusted: set[str] | None = None) -> tuple[str, Manifest]:
        """Raise if the task is not what its submitter signed; return the submitter's id and manifest."""
        job_id = assignment.job_id
        record = assignment.envelope
        if record is None:   # the link resolves a left-out envelope before a task runs (agent/daemon/envelopes.py)
            raise Forbidden(f"job {job_id}: the task came without its submitter's signed manifest",
                            code="no_manifest")
        # keyed by the envelope itself, not the job id a board names: boards choose their ids, and
        # one board naming another's job id must not get its own (or that board's) manifest reused
        key = hashlib.sha256(record.sig + record.payload).hexdigest()
        entry = self._cache.get(key)
        if entry is None:
            try:
                payload = record.verify()
                manifest = Manifest.from_dict(payload.get("manifest"), max_tasks=AGENT_MAX_TASKS)
                entry = (record.key.id, manifest, shard_points(manifest.inputs), len(record.payload))
            except PanalError as exc:
                raise Forbidden(f"job {job_id}: the submitter's manifest does not check out: {exc.message}",
                                code="bad_manifest") from exc
            self._cache[key] = entry
            self._bytes += entry[3]
            while len(self._cache) > 1 and (len(self._cache) > self.size or self._bytes > self.max_bytes):
                self._bytes -= self._cache.popitem(last=False)[1][3]
        self._cache.move_to_end(key)
        submitter, manifest, shards, _ = entry
        if trusted is not None and submitter not in trusted:
            raise Forbidden(f"job {job_id} is from submitter {submitter}, who is not in this agent's trust store",
                            code="untrusted_submitter")
        try:
            signed = manifest.point(assignment.idx, shards)
        except (IndexError, PanalError):   # no such unit, or a unit its kind refuses: not what was signed
            signed = None
        if manifest.kind != assignment.kind or signed != assignment.params:
            raise BadRequest(f"task {assignment.task_id} differs from what its submitter signed",
                             code="tampered_task")
        return submitter, manifest
