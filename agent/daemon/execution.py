"""One leased task, from the board's assignment to a signed result in the outbox, in clear steps.

1. check: the task is what its submitter signed (:mod:`agent.daemon.assignments`), and the link
   trusts that submitter (else the task is handed back), for its code too if the kind runs code;
2. inputs: every input blob, and a previous attempt's checkpoint, from the local cache or the board;
3. device: a free GPU that fits, else the CPU;
4. run: in a warm worker (a fresh sandboxed one for a kind that runs submitter code), reporting
   progress and uploading checkpoints as they come;
5. upload: output files become blobs on the board;
6. sign: the result names its outputs and environment under this agent's signature;
7. queue: the result goes to the link's outbox, to be delivered.
A task that fails in any step still gets a signed ``failed`` result, unless the board took it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from agent.client.blobcache import BlobCache, download_blob
from agent.client.blobupload import upload_file
from agent.daemon.assignments import ManifestCache
from agent.daemon.board_link import BoardLink, Running
from agent.daemon.devices import Devices
from agent.daemon.threads import task_threads
from agent.engine.runner import Outcome, TaskRequest, Worker, WorkerPool
from agent.engine.sandbox import probe as probe_sandbox
from agent.engine.sandbox_pool import SandboxPool
from agent.engine.sandbox_watch import remove_tree
from jobs.catalog import get_kind
from jobs.checkpoints import sign_checkpoint, verify_checkpoint
from jobs.errors import FailureClass
from jobs.inputs import input_blob
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from security.errors import BadRequest, PanalError
from security.httpsig import sign_request, sign_request_digest
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["Executor"]

log = logging.getLogger(__name__)


class Executor:
    """Runs leased tasks for the daemon; ``run`` is one task, the other methods are its steps."""

    def __init__(self, *, identity: Identity, work: Path, pool: WorkerPool, blobs: BlobCache, devices: Devices,
                 threads: int, gpu_memory_fraction: Callable[[], float],
                 capabilities: Callable[[], dict[str, Any]],
                 max_memory_gb: Callable[[], float | None] = lambda: None,
                 sandboxes: SandboxPool | None = None) -> None:
        self.identity = identity
        self.work = work
        self.pool = pool
        self.sandboxes = sandboxes   # the only place a sandboxed kind runs; None: it runs nowhere here
        self.blobs = blobs
        self.devices = devices
        self.threads = threads
        self.manifests = ManifestCache()
        self._gpu_memory_fraction = gpu_memory_fraction
        self._capabilities = capabilities
        self._max_memory_gb = max_memory_gb

    async def run(self, link: BoardLink, assignment: Assignment) -> Outcome | None:
        """Run one task and queue its signed result on ``link``; None when no result is ours to give
        (the task was handed back, or the board took it back while it ran)."""
        task_id = assignment.task_id
        running = Running(assignment)
        link.running[task_id] = running
        started = time.time()
        workdir = self.work / task_id
        outputs: dict[str, dict[str, Any]] = {}
        resume: SignedRecord | None = None
        try:
            submitter, manifest = self.manifests.check(assignment)
            if not link.trusts(submitter):
                await link.refuse(assignment, submitter)
                running.lost = True  # handed back: no result from us
                return None
            if _runs_code(manifest.kind) and not link.code.accepts(submitter):
                await link.refuse_code(assignment, submitter)   # a board that ignored our consent
                running.lost = True
                return None
            resume = self.resume_point(assignment)
            inputs = await self.fetch_inputs(link, manifest, assignment, resume)
            device = self.devices.take(manifest.requires)
            outcome = await self.execute(link, running, manifest, inputs, device, workdir)
            if outcome.ok and outcome.files and not running.lost:
                outputs = await self.upload_outputs(link, outcome.files)
        except PanalError as exc:
            # A busy GPU is transient (retry elsewhere); a task we must not run is permanent.
            failure = FailureClass.DEVICE_LOST if exc.code == "no_free_gpu" else FailureClass.UNSUPPORTED
            outcome = Outcome.failed(failure, exc.message, started)
        except Exception as exc:  # the daemon itself must survive anything a task does
            log.exception("running task %s failed", task_id)
            outcome = Outcome.failed(FailureClass.ERROR, f"agent error: {exc}", started)
        finally:
            link.running.pop(task_id, None)
            await asyncio.to_thread(remove_tree, workdir)   # as deep as a sandboxed task made it
        if running.lost:
            return None
        link.results.queue_result(self.sign(assignment, outcome, outputs, resume), outcome.ok)
        if not outcome.ok:
            log.warning("task %s failed (%s): %s", task_id, outcome.error_class, outcome.error)
        return outcome

    # -- the steps ----------------------------------------------------------------------------------
    @staticmethod
    def resume_point(assignment: Assignment) -> SignedRecord | None:
        """The checkpoint record to resume from, if the assignment names one that verifies: signed,
        for this task, written by this attempt (a lease given back uses none) or an earlier one, of the
        blob handed over. Anything else is ignored (the task starts afresh): a checkpoint nobody vouches
        for is not worth the risk."""
        if not assignment.checkpoint:
            return None
        if assignment.checkpoint_record is None:
            log.warning("task %s: checkpoint %s has no signed record: starting afresh", assignment.task_id,
                        assignment.checkpoint)
            return None
        try:
            verify_checkpoint(assignment.checkpoint_record, assignment.task_id, sha256=assignment.checkpoint,
                              before_attempt=assignment.attempt + 1)
        except PanalError as exc:
            log.warning("task %s: checkpoint refused (%s): starting afresh", assignment.task_id, exc.message)
            return None
        return assignment.checkpoint_record

    async def fetch_inputs(self, link: BoardLink, manifest: Manifest, assignment: Assignment,
                           resume: SignedRecord | None = None) -> dict[str, Path]:
        """Every input blob (and the verified checkpoint ``resume`` names, to resume from), verified by
        its hash, from the bounded local cache or the board."""
        fetch = self._blob_fetcher(link)
        paths = {}
        for name, ref in manifest.inputs.items():   # a split input: only this task's shard (jobs/inputs.py)
            paths[name] = await self.blobs.get(input_blob(ref, assignment.params), fetch)
        if resume is not None and assignment.checkpoint:
            paths["checkpoint"] = await self.blobs.get(assignment.checkpoint, fetch)
        return paths

    async def execute(self, link: BoardLink, running: Running, manifest: Manifest, inputs: dict[str, Path],
                      device: str, workdir: Path) -> Outcome:
        """Run the task in a warm worker on ``device`` (given back afterwards)."""
        assignment = running.assignment
        request = TaskRequest(kind=manifest.kind, params=assignment.params, timeout_s=manifest.timeout_s,
                              workdir=str(workdir), threads=task_threads(manifest.threads, self.threads),
                              max_memory_gb=self.memory_cap_gb(manifest),
                              inputs={name: str(path) for name, path in inputs.items()}, device=device,
                              devices=(device, *(d for d in self.devices.lent() if d != device)),
                              gpu_memory_fraction=self._gpu_memory_fraction())
        try:
            async with self._worker(manifest.kind, device) as worker:
                running.device, running.worker = device, worker   # what a pause stops (agent/daemon/pausing.py)
                outcome: Outcome = await worker.run(request, lambda f: setattr(running, "progress", f), running.cancel,
                                                    lambda path: self.store_checkpoint(link, running, path))
                return outcome
        finally:
            self.devices.give_back(device)
            await asyncio.gather(*running.uploads, return_exceptions=True)

    def _worker(self, kind: str, device: str) -> contextlib.AbstractAsyncContextManager[Worker]:
        """A warm worker, or for a kind that runs submitter code a fresh sandbox: never a fallback."""
        if not _runs_code(kind):
            return self.pool.worker()
        if self.sandboxes is None:
            raise BadRequest(f"kind {kind} runs submitter code and this agent has no sandbox: "
                             f"{probe_sandbox().describe()}", code="no_sandbox")
        return self.sandboxes.worker(gpu=device != "cpu")

    def memory_cap_gb(self, manifest: Manifest) -> float:
        """The task's memory cap (its manifest's, else the default), within the volunteer's ceiling."""
        ceiling = self._max_memory_gb()
        return min(manifest.memory_cap_gb, ceiling) if ceiling else manifest.memory_cap_gb

    def store_checkpoint(self, link: BoardLink, running: Running, path: str) -> None:
        """Upload a task's checkpoint as a blob; the next heartbeat tells the board, so a retry of
        this task (here or on another agent) resumes from it."""
        async def upload() -> None:
            try:
                sha = await upload_file(link.client.session(), link.client.base_url, Path(path), self._sign_digest)
                a = running.assignment
                running.checkpoint_record = sign_checkpoint(self.identity, a.task_id, a.job_id, a.attempt, sha)
                running.checkpoint = sha
            except (PanalError, OSError, aiohttp.ClientError) as exc:
                log.warning("checkpoint of task %s not stored: %s", running.assignment.task_id, exc)
            finally:
                await asyncio.to_thread(Path(path).unlink, missing_ok=True)

        task = asyncio.get_running_loop().create_task(upload())
        running.uploads.add(task)
        task.add_done_callback(running.uploads.discard)

    async def upload_outputs(self, link: BoardLink, files: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Upload output files as blobs; the signed result then names them by sha256."""
        outputs = {}
        for name, text in files.items():
            path = Path(text)
            sha = await upload_file(link.client.session(), link.client.base_url, path, self._sign_digest)
            size = (await asyncio.to_thread(path.stat)).st_size
            outputs[name] = {"sha256": sha, "size": size, "name": path.name}
        return outputs

    def sign(self, assignment: Assignment, outcome: Outcome, outputs: dict[str, dict[str, Any]],
             resume: SignedRecord | None = None) -> SignedRecord:
        """The result record, signed by this agent; it names the checkpoint it resumed from, if any,
        so the chain verifies offline (``panal results --verify``)."""
        payload: dict[str, Any] = {
            "task_id": assignment.task_id, "job_id": assignment.job_id,
            "lease_id": assignment.lease_id, "attempt": assignment.attempt, "agent_id": self.identity.id,
            "status": "ok" if outcome.ok else "failed", "started_at": outcome.started_at,
            "finished_at": outcome.finished_at, "metrics": outcome.metrics, "notes": outcome.notes,
            "environment": self.environment(),
            # what was run, under the same signature as what came of it (checked against the submitter's
            # manifest before running: agent/daemon/assignments.py), so a sweep's rows need no board's word
            "unit": assignment.idx, "params": assignment.params,
        }
        if resume is not None:
            payload["resumed_from"] = {"record": resume.to_wire()}
        if outcome.ok:
            payload["values"] = _altered_for_tests(outcome.values) if os.environ.get(ALTER_RESULTS_ENV) == "1" \
                else outcome.values
            payload["outputs"] = outputs
        else:
            payload["error_class"] = outcome.error_class or FailureClass.ERROR.value
            payload["error"] = outcome.error or ""
        return SignedRecord.sign(self.identity, payload)

    def environment(self) -> dict[str, Any]:
        """What the result was computed with (covered by the signature): versions and devices."""
        caps = self._capabilities()
        return {"os": caps.get("os"), "arch": caps.get("arch"), "python": caps.get("python"),
                "torch": caps.get("torch"), "cuda": caps.get("cuda"), "rocm": caps.get("rocm"),
                "cpu": (caps.get("cpu") or {}).get("model"),
                "gpus": [g.get("name") for g in caps.get("gpus") or []]}

    # -- signed transfers ---------------------------------------------------------------------------
    def _blob_fetcher(self, link: BoardLink) -> Callable[[str, Path], Awaitable[None]]:
        async def fetch(sha: str, dest: Path) -> None:
            headers = sign_request(self.identity, "GET", f"/v1/blobs/{sha}", "", b"")
            await download_blob(link.client.session(), link.client.base_url, sha, dest, headers)
        return fetch

    def _sign_digest(self, method: str, path: str, query: str, digest: str) -> dict[str, str]:
        return sign_request_digest(self.identity, method, path, query, digest)


def _runs_code(kind: str) -> bool:
    try:
        return get_kind(kind).sandboxed
    except PanalError:
        return False   # a kind this agent does not know fails in the worker as `unsupported`


#: TEST-ONLY: set to "1" in the environment of an agent that a test makes lie (tests/test_e2e_trust.py):
#: it signs altered values for every task. Off unless a test sets it; never set it on a real agent.
ALTER_RESULTS_ENV = "PANAL_TEST_ALTER_RESULTS"


def _altered_for_tests(values: dict[str, Any]) -> dict[str, Any]:
    """Every number shifted (a plausible-looking wrong answer), everything else as computed."""
    def alter(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [alter(v) for v in value] if isinstance(value, list) else value
        return value * 1.5 + 1
    return {k: alter(v) if not isinstance(v, dict) else _altered_for_tests(v) for k, v in values.items()}
