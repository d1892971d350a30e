"""The submitter's side: sign manifests, submit them, follow jobs, fetch and verify results."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.client import BoardClient
from jobs.manifest import Manifest
from security.errors import PanalError, Unauthorized
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["ResultCheck", "job_id_of", "make_envelope", "submit", "verify_results", "wait_job"]

TERMINAL = ("succeeded", "failed", "cancelled")


def make_envelope(identity: Identity, manifest: Manifest) -> dict[str, Any]:
    """The submitter-signed record of a manifest: what boards store and agents re-check."""
    value = {"manifest": manifest.source, "created": time.time(), "nonce": secrets.token_hex(8)}
    return SignedRecord.sign(identity, value).to_wire()


def job_id_of(envelope: dict[str, Any]) -> str:
    """A job's id is derived from its envelope's signature: re-submitting it is idempotent."""
    return "j" + hashlib.sha256(SignedRecord.from_wire(envelope).sig).hexdigest()[:20]


async def submit(client: BoardClient, envelope: dict[str, Any]) -> dict[str, Any]:
    reply = await client.call("POST", "/v1/jobs", {"envelope": envelope})
    job: dict[str, Any] = reply["job"]
    return job


async def wait_job(client: BoardClient, job_id: str, timeout_s: float,
                   on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Follow a job until it finishes or ``timeout_s`` passes; returns the last view."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        wait = max(0, min(int(left), 2 if on_update else 15))
        reply = await client.call("GET", f"/v1/jobs/{job_id}", query=f"wait={wait}", timeout_s=wait + 30.0)
        job: dict[str, Any] = reply["job"]
        if on_update is not None:
            on_update(job)
        if job["state"] in TERMINAL or time.monotonic() >= deadline:
            return job
        if wait == 0:
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class ResultCheck:
    task_id: str
    agent: str
    ok: bool
    problem: str
    payload: dict[str, Any]


def verify_results(reply: dict[str, Any]) -> list[ResultCheck]:
    """Check offline, for every result: the agent's signature, the digest the board recorded,
    and that the result belongs to this job; and check the job's own manifest signature."""
    envelope = SignedRecord.from_wire(reply["envelope"])
    envelope.verify()
    job_id = reply["job"]["id"]
    if job_id_of(reply["envelope"]) != job_id:
        raise Unauthorized(f"the manifest returned for {job_id} is not the one that job was created from",
                           code="wrong_envelope")
    checks = []
    for row in reply["results"]:
        task_id, agent = row["task_id"], row["agent"]
        try:
            record = SignedRecord.from_wire(row["record"])
            payload = record.verify()
            problems = []
            if record.key.id != agent:
                problems.append(f"signed by {record.key.id}, board says agent {agent}")
            if hashlib.sha256(record.payload).hexdigest() != row["digest"]:
                problems.append("digest differs from the one the board accepted")
            if payload.get("task_id") != task_id or payload.get("job_id") != job_id:
                problems.append("the signed result is for another task")
            checks.append(ResultCheck(task_id, agent, not problems, "; ".join(problems), payload))
        except PanalError as exc:
            checks.append(ResultCheck(task_id, agent, False, exc.message, {}))
    return checks
