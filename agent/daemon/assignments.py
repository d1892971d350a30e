"""Checking a leased task against its submitter's signed manifest before running it.

The board relays work; the agent does not have to trust it for *what* to run. The envelope's
signature must verify, and the task's kind and parameters must be exactly what that manifest
expands to at the task's index. A board that alters parameters gets its task refused.

A committed job (jobs/committed.py: the submitter signed a small head and the Merkle root of its units) is
checked without its lists: the assignment's params and shard data must prove unit ``idx`` against the signed
root, the head made a one-unit manifest must validate (once per envelope), and the params must be what that
head gives the unit's swept values and shard. The task's shard blob then comes from the proven shard only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from jobs.catalog import get_kind
from jobs.committed import CommittedHead, at_unit, committed_units
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


@dataclass
class _Entry:
    """One verified envelope: its signer, its manifest (of a committed one: the first proven unit's, built at
    its first check) and its shards' rows; of a committed one its head."""

    submitter: str
    manifest: Manifest | None
    shards: list[dict[str, int]]
    size: int
    head: CommittedHead | None = None


class ManifestCache:
    """Verified manifests (and their shards) by envelope, bounded in entries and in bytes."""

    def __init__(self, size: int = 64, max_bytes: int = MAX_CACHED_BYTES) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def check(self, assignment: Assignment, trusted: set[str] | None = None) -> tuple[str, Manifest]:
        """Raise if the task is not what its submitter signed; return the submitter's id and manifest (of a
        committed job, the manifest of this one unit)."""
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
                if committed_units(payload) is not None:
                    entry = _Entry(record.key.id, None, [], len(record.payload), CommittedHead(payload))
                else:
                    # not expanded: validating every unit of a few-KB manifest sweeping 10^8 of them (anyone's
                    # signature: trust is checked below) held them all; the unit this task runs is checked below
                    manifest = Manifest.from_dict(payload.get("manifest"), max_tasks=AGENT_MAX_TASKS, expand=False)
                    entry = _Entry(record.key.id, manifest, shard_points(manifest.inputs), len(record.payload))
            except PanalError as exc:
                raise Forbidden(f"job {job_id}: the submitter's manifest does not check out: {exc.message}",
                                code="bad_manifest") from exc
            self._cache[key] = entry
            self._bytes += entry.size
            while len(self._cache) > 1 and (len(self._cache) > self.size or self._bytes > self.max_bytes):
                self._bytes -= self._cache.popitem(last=False)[1].size
        self._cache.move_to_end(key)
        if trusted is not None and entry.submitter not in trusted:
            raise Forbidden(f"job {job_id} is from submitter {entry.submitter}, who is not in this agent's trust "
                            "store", code="untrusted_submitter")
        if entry.head is not None:
            return entry.submitter, self._unit(entry, entry.head, assignment)
        whole = entry.manifest
        assert whole is not None
        try:
            signed = whole.point(assignment.idx, entry.shards)
        except (IndexError, PanalError):   # no such unit, or a unit its kind refuses: not what was signed
            signed = None
        if whole.kind != assignment.kind or signed != assignment.params:
            raise _tampered(assignment)
        return entry.submitter, whole

    @staticmethod
    def _unit(entry: _Entry, head: CommittedHead, assignment: Assignment) -> Manifest:
        """A committed job's task: its unit proven against the signed root, then held to the head's rules."""
        proof = assignment.proof
        if proof is None or not head.proves(assignment.idx, assignment.params, proof):
            raise _tampered(assignment)
        if entry.manifest is None:   # proven first: a board cannot make an unsigned unit the head's example
            try:
                entry.manifest = head.unit_manifest(assignment.params, proof.shards, AGENT_MAX_TASKS)
            except PanalError as exc:
                raise Forbidden(f"job {assignment.job_id}: the submitter's manifest does not check out: "
                                f"{exc.message}", code="bad_manifest") from exc
            entry.shards = shard_points(entry.manifest.inputs)
        manifest = entry.manifest
        shard: dict[str, Any] = {}
        for s in proof.shards.values():
            shard = {"row_start": s["start"], "row_end": s["start"] + s["rows"], "data_offset": s["start"]}
        if not proof.shards:
            shard = entry.shards[assignment.idx % len(entry.shards)]
        try:
            signed = get_kind(manifest.kind).validate(
                {**manifest.params, **{k: assignment.params[k] for k in head.sweep}, **shard})
        except (KeyError, PanalError):
            signed = None
        if manifest.kind != assignment.kind or signed != assignment.params:
            raise _tampered(assignment)
        return at_unit(manifest, proof.shards)


def _tampered(assignment: Assignment) -> BadRequest:
    return BadRequest(f"task {assignment.task_id} differs from what its submitter signed", code="tampered_task")
