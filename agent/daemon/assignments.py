"""Checking a leased task against its submitter's signed manifest before running it.

The board relays work; the agent does not have to trust it for *what* to run. The envelope's
signature must verify, and the task's kind and parameters must be exactly what that manifest
expands to at the task's index. A board that alters parameters gets its task refused.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from jobs.manifest import Manifest
from jobs.protocol import Assignment
from security.errors import BadRequest, Forbidden, PanalError

__all__ = ["ManifestCache"]


class ManifestCache:
    """Verified manifests (and their expanded task parameters) by job id, bounded."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._cache: OrderedDict[str, tuple[str, Manifest, list[dict[str, Any]]]] = OrderedDict()

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
                manifest = Manifest.from_dict(payload.get("manifest"))
                entry = (record.key.id, manifest, manifest.points())
            except PanalError as exc:
                raise Forbidden(f"job {job_id}: the submitter's manifest does not check out: {exc.message}",
                                code="bad_manifest") from exc
            self._cache[key] = entry
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        submitter, manifest, points = entry
        if trusted is not None and submitter not in trusted:
            raise Forbidden(f"job {job_id} is from submitter {submitter}, who is not in this agent's trust store",
                            code="untrusted_submitter")
        idx = assignment.idx
        if manifest.kind != assignment.kind or not 0 <= idx < len(points) or points[idx] != assignment.params:
            raise BadRequest(f"task {assignment.task_id} differs from what its submitter signed",
                             code="tampered_task")
        return submitter, manifest
