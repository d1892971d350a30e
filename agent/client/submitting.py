"""The submitter's side: sign manifests, submit them, follow jobs, fetch and verify results."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.client.blobcache import download_blob, hash_file
from agent.client.blobupload import upload_file
from agent.client.board import BoardClient
from agent.client.sharding import shard_input
from jobs.checkpoints import checkpoint_problem
from jobs.committed import COMMIT_BYTES, commit
from jobs.manifest import Manifest
from security.errors import BadRequest, PanalError, Unauthorized
from security.httpsig import sign_request, sign_request_digest
from security.identity import Identity
from security.records import SignedRecord, canonical

__all__ = ["ResultCheck", "job_id_of", "make_envelope", "output_file_name", "prepare_inputs", "run_job", "submit",
           "upload_inputs", "verify_results", "wait_job"]

TERMINAL = ("succeeded", "failed", "cancelled")
_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,16}$")
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[0-9]{1,9}$")   # "<job id>.<index>" (hub/intake.py)


def make_envelope(identity: Identity, manifest: Manifest, commit_bytes: int = COMMIT_BYTES) -> dict[str, Any]:
    """The submitter-signed record of a manifest: what boards store and agents re-check. A big one (signed
    whole, over ``commit_bytes`` of payload and signature) is committed (jobs/committed.py): the head and the
    Merkle root of its units are signed, and its sweep and shard lists ride beside the signature (``units``),
    bound by the root."""
    if len(canonical({"manifest": manifest.source})) <= commit_bytes:
        value = {"manifest": manifest.source, "created": time.time(), "nonce": secrets.token_hex(8)}
        whole = SignedRecord.sign(identity, value)
        # the record as a board sizes it (hub/envelopes.py: payload and signature), not the bare manifest: one
        # ~100 bytes under the threshold would be signed whole yet too big to inline, and fetched by every agent
        if len(whole.payload) + len(whole.sig) <= commit_bytes:
            return whole.to_wire()
    signed, lists = commit(manifest.source)
    wire = SignedRecord.sign(identity, {**signed, "created": time.time(), "nonce": secrets.token_hex(8)}).to_wire()
    wire["units"] = lists
    return wire


def job_id_of(envelope: dict[str, Any]) -> str:
    """A job's id is derived from its envelope's signature: re-submitting it is idempotent."""
    return "j" + hashlib.sha256(SignedRecord.from_wire(envelope).sig).hexdigest()[:20]


def prepare_inputs(manifest: Manifest) -> tuple[Manifest, list[tuple[str, Path]]]:
    """Hash every local input file; return the manifest to sign (paths -> blob refs) and the files."""
    if not manifest.inputs or all(ref.blob or ref.shards for ref in manifest.inputs.values()):
        return manifest, []
    source = copy.deepcopy(manifest.source)
    files: list[tuple[str, Path]] = []
    base_dir = manifest.base_dir or Path(".")
    for name, ref in manifest.inputs.items():
        if ref.shard_count or ref.paths is not None:   # one blob per shard (agent/client/sharding.py)
            ref, uploads = shard_input(ref, base_dir)
            files.extend(uploads)
            source["spec"]["inputs"][name] = ref.to_source()
            continue
        if ref.path is None:
            continue
        path = base_dir / ref.path
        sha, size = hash_file(path)
        files.append((sha, path))
        source["spec"]["inputs"][name] = dataclasses.replace(ref, blob=sha, size=size,
                                                             path=Path(ref.path).name).to_source()
    return Manifest.from_dict(source), files


async def upload_inputs(client: BoardClient, files: list[tuple[str, Path]],
                        progress: Callable[[int], None] | None = None) -> None:
    """Upload input files as blobs (skipping those the board already has), before the manifest."""
    def sign(method: str, path: str, query: str, digest: str) -> dict[str, str]:
        return sign_request_digest(client.identity, method, path, query, digest)

    for sha, path in files:
        uploaded = await upload_file(client.session(), client.base_url, path, sign, progress)
        if uploaded != sha:
            raise BadRequest(f"{path} changed while it was being submitted", code="input_changed")


async def submit(client: BoardClient, envelope: dict[str, Any], wait_s: int = 0) -> dict[str, Any]:
    """Submit a signed envelope; the job's view. ``wait_s``: the board holds the reply until the job
    finishes (at most that long, and its own ``max_poll_wait_s``): submit to result in one request. A retry
    of the same envelope is idempotent, so a reply lost while waiting costs nothing but the wait."""
    reply = await client.call("POST", "/v1/jobs", {"envelope": envelope}, query=f"wait={wait_s}" if wait_s else "",
                              timeout_s=wait_s + 30.0)
    job: dict[str, Any] = reply["job"]
    return job


async def run_job(client: BoardClient, envelope: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Submit and follow the job until it finishes or ``timeout_s`` passes: the last view. The first
    wait rides in the submit itself (no second request for a job that is done within it)."""
    deadline = time.monotonic() + timeout_s
    job = await submit(client, envelope, wait_s=max(0, min(int(timeout_s), 15)))
    left = deadline - time.monotonic()
    if job["state"] in TERMINAL or left <= 0:
        return job
    return await wait_job(client, job["id"], left)


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


async def fetch_outputs(client: BoardClient, checks: list[ResultCheck], out_dir: Path) -> dict[str, list[str]]:
    """Download each result's output files into ``out_dir/<task>/<name>`` and check them against the
    digests the agent signed. A file already there is re-hashed instead: a modified output is reported."""
    problems: dict[str, list[str]] = {}
    for check in checks:
        for name, meta in (check.payload.get("outputs") or {}).items():
            sha = str(meta.get("sha256", ""))
            dest = out_dir / task_dir_name(check.task_id) / output_file_name(name, meta)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                headers = sign_request(client.identity, "GET", f"/v1/blobs/{sha}", "", b"")
                await download_blob(client.session(), client.base_url, sha, dest, headers)
            got, _ = await asyncio.to_thread(hash_file, dest)
            if got != sha:
                problems.setdefault(check.task_id, []).append(
                    f"output {name} ({dest}) does not match the digest the agent signed")
    return problems


def task_dir_name(task_id: str) -> str:
    """The local folder of a task's outputs: its id when it is a plain task id, else a hash of it, so a
    board (with an agent signing along) that names a task ``../../x`` never chooses a path."""
    return task_id if _TASK_ID.match(task_id) else "task-" + hashlib.sha256(task_id.encode()).hexdigest()[:16]


def output_file_name(name: str, meta: dict[str, Any]) -> str:
    """The local file name of output ``name``: the name plus the extension of the file the agent wrote
    (``outputs`` -> ``outputs.safetensors``), so tools recognise it. Only a plain extension is taken from
    the agent's signed ``name`` (letters and digits after a dot): never a path."""
    if not _OUTPUT_NAME.match(name):   # a lying agent's "../../.bashrc" never becomes a path (verify_results flags it)
        name = "output-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    suffix = Path(str(meta.get("name") or "")).suffix
    return name + suffix if _EXTENSION.match(suffix) and not name.endswith(suffix) else name


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
            if not str(task_id).startswith(f"{job_id}.") or not _TASK_ID.match(str(task_id)):
                problems.append(f"task id {task_id!r} is not one of job {job_id}'s")
            if (resumed := checkpoint_problem(payload)) is not None:   # the checkpoint chain (provenance)
                problems.append(resumed)
            problems.extend(f"output name {name!r} is not a plain name" for name in payload.get("outputs") or {}
                            if not _OUTPUT_NAME.match(str(name)))
            checks.append(ResultCheck(task_id, agent, not problems, "; ".join(problems), payload))
        except PanalError as exc:
            checks.append(ResultCheck(task_id, agent, False, exc.message, {}))
    return checks
