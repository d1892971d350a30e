"""Submission intake: a submitter-signed manifest becomes a job row and its task rows.

The job id is a digest of the submitter's signature, so submitting the same envelope twice names
the same job (the board answers the first one). Inputs are uploaded before the manifest: a job
never exists with a missing input.

A committed envelope (jobs/committed.py: a big job's head and the Merkle root of its units) comes with its
sweep and shard lists beside the signature (the envelope map's ``units``): the full manifest is rebuilt from
both and validated as any other, its tree must be the signed one (else ``units_root_mismatch``), and the
lists are stored with the envelope, so a restarted board proves units again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hub.blob_backend import BlobBackend
from hub.config import HubConfig
from hub.records import JobRow, JobState, TaskRow
from hub.trust.policy import ValidationPolicy
from jobs.catalog import get_kind
from jobs.committed import UNIT_PROOFS, UnitProofs, committed_units, open_lists
from jobs.manifest import DEFAULT_MEMORY_GB, Manifest
from security.errors import BadRequest, Forbidden
from security.records import SignedRecord

__all__ = ["Envelope", "hub_limits", "new_job", "over_limits", "required_features", "stored_job_requires"]


class Envelope:
    """A verified submitter-signed envelope and the job id it names."""

    def __init__(self, wire: Any, signer_id: str) -> None:
        record = SignedRecord.from_wire(wire)
        if record.key.id != signer_id:
            raise Forbidden(f"manifest is signed by {record.key.id}, request by {signer_id}",
                            code="signer_mismatch")
        self.payload = record.verify()
        self.record, self.signer_id = record, signer_id
        self.job_id = "j" + hashlib.sha256(record.sig).hexdigest()[:20]
        #: a committed manifest's lists (unsigned, bound by the signed root), and once checked its proofs
        self.lists: Any = wire.get("units") if isinstance(wire, dict) else None
        self.proofs: UnitProofs | None = None


def required_features(stored: Any) -> list[str]:
    """The protocol features an agent must report to be sent a job stored as ``stored`` (its envelope): a committed
    job's tasks go only to agents that check unit proofs (an older agent refuses each one as tampered)."""
    return [UNIT_PROOFS] if isinstance(stored, dict) and stored.get("units") is not None else []


def stored_job_requires(job: JobRow) -> None:
    """Add to a job read from the store the clauses intake adds today that a hub before them did not write
    (``features`` before unit proofs), so the job goes where it would if submitted now (in memory; written with
    the job's next change)."""
    features = job.requires.get("features")
    have = set(features) if isinstance(features, list) else set()
    needed = required_features(job.envelope)
    if not have.issuperset(needed):
        job.requires = {**job.requires, "features": sorted(have.union(needed))}


def new_job(envelope: Envelope, config: HubConfig, blobs: BlobBackend | None,
            now: float) -> tuple[JobRow, list[TaskRow]]:
    """The job and its queued tasks (raises on a bad manifest or a missing input)."""
    stored = envelope.record.to_wire()
    if committed_units(envelope.payload) is None:
        manifest = Manifest.from_dict(envelope.payload.get("manifest"), max_tasks=config.max_tasks_per_job)
        points = None
    else:
        manifest, points, envelope.proofs = open_lists(envelope.payload, envelope.lists, config.max_tasks_per_job)
        stored["units"] = envelope.lists
    over = over_limits(manifest, config)
    if over:
        raise BadRequest("; ".join(f"{path}: {message}" for path, message in over), code="over_hub_limit",
                         details=[{"path": path, "message": message} for path, message in over])
    _check_blobs(manifest, blobs)
    job_id = envelope.job_id
    policy = ValidationPolicy.resolve(manifest.validation, manifest.replicas, get_kind(manifest.kind),
                                      config.validation_quorum)
    job = JobRow(id=job_id, name=manifest.name, submitter_id=envelope.signer_id, kind=manifest.kind,
                 priority=manifest.priority, state=JobState.QUEUED, created_at=now,
                 n_tasks=manifest.n_tasks, envelope=stored,
                 requires={**manifest.requires.to_dict(), "task_memory_gb": manifest.memory_cap_gb,
                           **({"code_from": envelope.signer_id} if get_kind(manifest.kind).sandboxed else {}),
                           **({"features": features} if (features := required_features(stored)) else {})},
                 timeout_s=manifest.timeout_s,
                 max_attempts=manifest.retries + 1,
                 deadline_at=now + manifest.deadline_s if manifest.deadline_s else None,
                 labels=manifest.labels)
    job.validation = policy.to_dict()
    job.report = manifest.report.to_dict() if manifest.report else {}
    points = manifest.points() if points is None else points
    tasks = [TaskRow(id=f"{job_id}.{i}", job_id=job_id, idx=i, params=params, updated_at=now)
             for i, params in enumerate(points)]
    for _ in range(policy.initial_instances() - 1):   # a fixed quorum: every instance from the start
        base = len(tasks)
        tasks += [TaskRow(id=f"{job_id}.{base + i}", job_id=job_id, idx=base + i, params=params,
                          updated_at=now, unit=i) for i, params in enumerate(points)]
    job.n_tasks = len(tasks)
    return job, tasks


def hub_limits(config: HubConfig) -> dict[str, Any]:
    """What this hub allows a job (``GET /v1/limits``; ``panal validate --hub`` checks against it)."""
    return {"max_task_timeout_s": config.max_task_timeout_s, "max_task_memory_gb": config.max_task_memory_gb,
            "default_task_memory_gb": DEFAULT_MEMORY_GB, "max_tasks_per_job": config.max_tasks_per_job,
            "max_result_bytes": config.max_result_bytes, "max_blob_bytes": config.max_blob_bytes,
            "upload_chunk_bytes": config.upload_chunk_bytes,
            "max_body_bytes": config.max_body_bytes}   # agents size their result batches under it


def over_limits(manifest: Manifest, limits: HubConfig | dict[str, Any]) -> list[tuple[str, str]]:
    """The ``spec.resources`` a hub's limits refuse, as (field path, message) pairs."""
    values = hub_limits(limits) if isinstance(limits, HubConfig) else limits
    most_s, most_gb = float(values["max_task_timeout_s"]), float(values["max_task_memory_gb"])
    over = []
    if manifest.timeout_s > most_s:
        over.append(("spec.resources.timeout", f"{manifest.timeout_s:g} s is over this hub's limit of {most_s:g} s "
                     "(max_task_timeout_s)"))
    if manifest.memory_cap_gb > most_gb:
        over.append(("spec.resources.max_memory_gb", f"{manifest.memory_cap_gb:g} GB is over this hub's limit of "
                     f"{most_gb:g} GB (max_task_memory_gb)"))
    return over


def _check_blobs(manifest: Manifest, blobs: BlobBackend | None) -> None:
    for ref in manifest.inputs.values():
        if ref.path is not None:
            raise BadRequest(f"spec.inputs.{ref.name}: a local path reached the board; submit with "
                             "`panal submit`, which uploads inputs first", code="input_not_uploaded")
        if blobs is not None and ref.blob is not None and not blobs.exists(ref.blob):
            raise BadRequest(f"spec.inputs.{ref.name}: blob {ref.blob} is not on this board; upload it "
                             "first (PUT /v1/blobs/{sha256})", code="missing_blob")
