"""The volunteer daemon: pull work from every known board, run it in warm workers, return it signed.

One :class:`BoardLink` per board runs three loops: lease (long-poll, carrying finished results on
the way), heartbeat (extends the leases of running tasks and learns which were lost) and flush
(delivers results when no lease request is about to carry them). Slots are shared by all boards;
each board loop reserves its share before it polls. On SIGTERM the daemon stops leasing, lets
running tasks finish for ``drain_s``, hands back the rest, and delivers what it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent import capabilities
from agent.assignments import ManifestCache
from agent.blobcache import BlobCache, download_blob
from agent.blobupload import upload_file
from agent.breaker import Breaker
from agent.capabilities_probe import detect_capabilities
from agent.client import BoardClient
from agent.control import ControlServer, default_socket_path
from agent.home import AgentHome
from agent.kind_health import KindHealth
from agent.outbox import Outbox
from agent.pause_rules import PauseRules, SystemLoad
from agent.preferences import PreferencesFile
from agent.runner import Outcome, TaskRequest, WorkerPool
from jobs.errors import FailureClass
from jobs.manifest import Manifest
from jobs.requirements import Gpu
from security.errors import BadRequest, Forbidden, PanalError
from security.httpsig import sign_request, sign_request_digest
from security.identity import Identity
from security.records import SignedRecord, decode
from security.tls import BoardAddress

__all__ = ["Daemon", "DaemonSettings"]

log = logging.getLogger(__name__)
UNTRUSTED_COOLDOWN_S = 30.0


@dataclass
class DaemonSettings:
    slots: int = 0                   # 0: the volunteer's max_concurrent_tasks preference
    threads: int = 0                 # 0: the cpu_threads preference, else cores / slots
    name: str = ""
    poll_wait_s: float = 20.0
    drain_s: float = 30.0
    insecure: bool = False
    capabilities: dict[str, Any] = field(default_factory=dict)   # overrides of the detected report
    blob_cache_bytes: int = 20 * 2**30   # inputs kept locally (LRU) so shards of one model download once


@dataclass
class Running:
    assignment: dict[str, Any]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    progress: float = 0.0
    lost: bool = False
    checkpoint: str | None = None      # sha256 of the latest checkpoint uploaded to the board
    uploads: set[asyncio.Task[None]] = field(default_factory=set)


class BoardLink:
    """Everything the daemon keeps about one board."""

    def __init__(self, address: BoardAddress, client: BoardClient, outbox: Outbox,
                 trusted: Callable[[str], bool] | None = None) -> None:
        self.address = address
        self.client = client
        self.outbox = outbox
        self.trusted = trusted            # None: trust the board's submitters (a WAN hub vouches)
        self.cooldown_until = 0.0         # monotonic time before which we do not lease from it
        self.refused: str | None = None   # why the board gives us no work (quarantine), if it says
        self.loops: list[asyncio.Task[None]] = []
        self.pending: list[dict[str, Any]] = outbox.load()
        self.running: dict[str, Running] = {}
        self.flush = asyncio.Event()
        self.lease_ttl_s = 30.0
        self.registered = False
        self.done = 0
        self.failed = 0

    def take_pending(self) -> list[dict[str, Any]]:
        taken, self.pending = self.pending, []
        return taken

    def settle(self, sent: list[dict[str, Any]], outcomes: list[Any]) -> None:
        """Drop delivered results from the outbox; keep those the board did not answer for."""
        # The board answers one outcome per result, in order (two attempts of one task can travel
        # together, so matching by task id alone would be ambiguous).
        answers = [o if isinstance(o, dict) else None for o in outcomes] if len(outcomes) == len(sent) \
            else [None] * len(sent)
        for record, outcome in zip(sent, answers, strict=True):
            if outcome is None:
                self.pending.append(record)
                continue
            key = outbox_key(record)
            if outcome.get("status") == "rejected":
                log.warning("board %s rejected the result of task %s: %s", self.address.url,
                            outcome.get("task_id", key), outcome.get("message"))
            self.outbox.remove(key)


def outbox_key(record: dict[str, Any]) -> str:
    """A result's outbox name: task and lease, so two attempts of one task never share a file."""
    try:
        payload = decode(SignedRecord.from_wire(record).payload)
        return f"{payload.get('task_id')}.{payload.get('lease_id')}"
    except PanalError:
        return "unreadable"


class Daemon:
    def __init__(self, home: AgentHome, boards: list[BoardAddress], settings: DaemonSettings,
                 allow_no_board: bool = False) -> None:
        if not boards and not allow_no_board:
            raise Forbidden("this agent has joined no board: run `panal agent join JOIN_URL` first",
                            code="no_board")
        self.home = home
        self.settings = settings
        self.identity: Identity = home.agent_identity()
        self.boards = boards
        self.links: list[BoardLink] = []
        self.slot_freed = asyncio.Condition()
        self.manifests = ManifestCache()
        self.prefs = PreferencesFile(home.root / "prefs.yaml")
        self.rules = PauseRules(lambda: self.prefs.current, SystemLoad(), usage_path=home.root / "usage.json")
        slots = settings.slots or self.prefs.current.max_concurrent_tasks
        self.settings.slots = slots
        self.free = slots
        self.pool = WorkerPool(slots)
        self.gpus_busy: set[str] = set()
        self.kind_health = KindHealth()
        self.blobs = BlobCache(home.root / "blobs", settings.blob_cache_bytes)
        self.capabilities = capabilities.basic(settings.capabilities)
        self.stopping = False
        self.paused_reason: str | None = None
        self.threads = (settings.threads or self.prefs.current.cpu_threads
                        or max(1, (os.cpu_count() or 1) // max(1, slots)))
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Extension points (LAN mode): coroutines run once the daemon is up, and extra status fields.
        self.on_start: list[Callable[[Daemon], Awaitable[None]]] = []
        self.status_extras: list[Callable[[], dict[str, Any]]] = []

    # -- boards come and go (LAN peers) ---------------------------------------------------------
    def add_board(self, address: BoardAddress, trusted: Callable[[str], bool] | None = None,
                  retry_for_s: float = 10.0) -> BoardLink:
        """Start pulling from a board. ``trusted`` (a submitter-id check) restricts whose work runs."""
        for link in self.links:
            if link.address.url == address.url:
                return link
        client = BoardClient(address, self.identity, insecure=self.settings.insecure,
                             retry_for_s=retry_for_s, breaker=Breaker(name=address.url))
        link = BoardLink(address, client, Outbox(self.home.outbox, address.url), trusted)
        self.links.append(link)
        link.loops = [asyncio.create_task(self._lease_loop(link), name=f"lease {address.url}"),
                      asyncio.create_task(self._flush_loop(link), name="flush")]
        self._loops += link.loops
        return link

    async def remove_board(self, url: str) -> None:
        """Stop leasing from a board (a LAN peer left). Running tasks finish; results stay in the outbox."""
        for link in list(self.links):
            if link.address.url == url:
                for task in link.loops:
                    task.cancel()
                await asyncio.gather(*link.loops, return_exceptions=True)
                self.links.remove(link)
                if not link.running:
                    await link.client.close()

    # -- life cycle -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.capabilities = await detect_capabilities(self.home, self.settings.capabilities)
        await self.pool.warm()
        control = ControlServer(default_socket_path(), self)
        try:
            await control.start()
        except PanalError as exc:
            log.warning("control socket unavailable (`panal agent status` will not work): %s", exc.message)
        self._loops.append(asyncio.create_task(self._volunteer_loop(), name="volunteer"))
        self._loops.append(asyncio.create_task(self._kind_probe_loop(), name="kind-probe"))
        for address in self.boards:
            self.add_board(address)
        for hook in self.on_start:
            await hook(self)
        log.info("agent %s running with %d slot(s) on %d board(s)", self.identity.id, self.settings.slots,
                 len(self.links))
        await stop.wait()
        await self.shutdown()
        await control.close()
        self.rules.flush()

    async def shutdown(self) -> None:
        """Stop leasing; let running tasks finish for drain_s; release the rest; deliver results."""
        self.stopping = True
        leasers = [t for t in self._loops if t.get_name().startswith("lease")]
        for task in leasers:
            task.cancel()
        await asyncio.gather(*leasers, return_exceptions=True)
        if self._tasks:
            log.info("draining %d running task(s) for up to %.0f s", len(self._tasks), self.settings.drain_s)
            _, still = await asyncio.wait(self._tasks, timeout=self.settings.drain_s)
            for link in self.links:
                for task_id, running in list(link.running.items()):
                    running.lost = True
                    running.cancel.set()
                    with contextlib.suppress(PanalError):
                        await link.client.call("POST", f"/v1/tasks/{task_id}/release",
                                               {"lease_id": running.assignment["lease_id"]}, retry=False,
                                               timeout_s=5.0)
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        for link in self.links:
            if link.pending:
                await self._deliver(link, retry=False)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.pool.close()
        for link in self.links:
            await link.client.close()

    # -- slots ----------------------------------------------------------------------------------
    async def _reserve(self) -> int:
        async with self.slot_freed:
            await self.slot_freed.wait_for(lambda: self.free > 0 and self.paused_reason is None)
            share = max(1, self.free // max(1, len(self.links)))  # each board gets its fair share
            self.free -= share
            return share

    async def _unreserve(self, n: int) -> None:
        if n <= 0:
            return
        async with self.slot_freed:
            self.free += n
            self.slot_freed.notify_all()

    # -- loops ----------------------------------------------------------------------------------
    async def _register(self, link: BoardLink) -> None:
        caps = dict(self.capabilities)
        caps["kinds"] = self.kind_health.advertised(list(caps.get("kinds") or []))
        body = {"public_key": self.identity.public.text(), "name": self.settings.name or platform.node(),
                "capabilities": caps}
        while True:
            try:
                reply = await link.client.call("POST", "/v1/agents", body)
                link.lease_ttl_s = float(reply.get("lease_ttl_s", 30.0))
                link.registered = True
                log.info("registered with %s as %s", link.address.url, self.identity.id)
                return
            except PanalError as exc:
                log.warning("cannot register with %s: %s", link.address.url, exc.message)
                await asyncio.sleep(max(1.0, link.client.breaker.retry_in()))

    async def _lease_loop(self, link: BoardLink) -> None:
        await self._register(link)
        # Heartbeats start once the board has told us its lease TTL.
        heartbeat = asyncio.create_task(self._heartbeat_loop(link), name="heartbeat")
        link.loops.append(heartbeat)
        self._loops.append(heartbeat)
        while not self.stopping:
            wait = link.cooldown_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            n = await self._reserve()
            sent = link.take_pending()
            try:
                # With several boards, shorter polls: a slot held by an idle board's long-poll is a slot
                # a busy board cannot use.
                wait_s = self.settings.poll_wait_s if len(self.links) <= 1 else min(self.settings.poll_wait_s, 2.0)
                reply = await link.client.call(
                    "POST", "/v1/lease", {"slots": n, "wait_s": wait_s, "results": sent},
                    timeout_s=wait_s + 15.0)
            except asyncio.CancelledError:
                link.pending[:0] = sent
                await self._unreserve(n)
                raise
            except PanalError as exc:
                link.pending[:0] = sent
                await self._unreserve(n)
                if exc.code == "not_registered":
                    await self._register(link)
                    continue
                log.warning("lease from %s failed: %s", link.address.url, exc.message)
                await asyncio.sleep(max(1.0, link.client.breaker.retry_in()))
                continue
            link.settle(sent, reply.get("results", []))
            if reply.get("refused") != link.refused:
                link.refused = reply.get("refused")
                if link.refused:
                    log.warning("%s gives this agent no work: %s", link.address.url, link.refused)
            tasks = reply.get("tasks", [])
            if link.refused and not tasks:
                await self._unreserve(n)
                await asyncio.sleep(min(self.settings.poll_wait_s, 10.0))  # quarantined: don't spin
                continue
            await self._unreserve(n - len(tasks))
            if not tasks:
                await asyncio.sleep(0)  # let other boards' loops take the slot we just gave back
            for assignment in tasks:
                task = asyncio.create_task(self._execute(link, assignment), name=f"task {assignment['task_id']}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _heartbeat_loop(self, link: BoardLink) -> None:
        while True:
            await asyncio.sleep(max(0.2, link.lease_ttl_s / 4))
            if not link.running:
                continue
            leases = [{"task_id": tid, "lease_id": r.assignment["lease_id"], "progress": r.progress,
                       **({"checkpoint": r.checkpoint} if r.checkpoint else {})}
                      for tid, r in link.running.items()]
            try:
                reply = await link.client.call("POST", "/v1/heartbeat", {"leases": leases}, timeout_s=10.0)
            except PanalError as exc:
                log.warning("heartbeat to %s failed: %s", link.address.url, exc.message)
                continue
            for lost in reply.get("lost", []):
                running = link.running.get(lost.get("task_id"))
                if running is not None:
                    log.warning("task %s no longer leased to us (%s): stopping it", lost["task_id"], lost["reason"])
                    running.lost = True
                    running.cancel.set()

    async def _flush_loop(self, link: BoardLink) -> None:
        while True:
            await link.flush.wait()
            link.flush.clear()
            await asyncio.sleep(0.005)  # a lease request about to go out will carry them
            if link.pending:
                await self._deliver(link, retry=True)

    async def _deliver(self, link: BoardLink, retry: bool) -> None:
        sent = link.take_pending()
        try:
            reply = await link.client.call("POST", "/v1/results", {"results": sent}, retry=retry, timeout_s=15.0)
        except PanalError as exc:
            link.pending[:0] = sent
            log.warning("results for %s kept in the outbox: %s", link.address.url, exc.message)
            if retry and not self.stopping:
                asyncio.get_running_loop().call_later(max(1.0, link.client.breaker.retry_in()), link.flush.set)
            return
        link.settle(sent, reply.get("results", []))

    # -- running a task -------------------------------------------------------------------------
    async def _execute(self, link: BoardLink, assignment: dict[str, Any]) -> None:
        try:
            await self._run_and_report(link, assignment)
        finally:
            await self._unreserve(1)

    async def _run_and_report(self, link: BoardLink, assignment: dict[str, Any]) -> None:
        task_id = str(assignment["task_id"])
        running = Running(assignment)
        link.running[task_id] = running
        started = time.time()
        workdir = self.home.work / task_id
        outputs: dict[str, dict[str, Any]] = {}
        try:
            submitter, manifest = self.manifests.check(assignment)
            if link.trusted is not None and not link.trusted(submitter):
                await self._refuse_untrusted(link, assignment, submitter)
                running.lost = True  # handed back: no result from us
                return
            inputs = await self._fetch_inputs(link, manifest)
            if assignment.get("checkpoint"):  # a previous attempt's checkpoint: resume from it
                inputs["checkpoint"] = await self.blobs.get(str(assignment["checkpoint"]),
                                                            self._blob_fetcher(link))
            device = self._take_device(manifest)
            request = TaskRequest(kind=manifest.kind, params=assignment["params"], timeout_s=manifest.timeout_s,
                                  workdir=str(workdir), threads=self.threads, max_memory_gb=manifest.max_memory_gb,
                                  inputs={name: str(path) for name, path in inputs.items()}, device=device,
                                  devices=(device, *(d for d in self._devices() if d != device)),
                                  gpu_memory_fraction=self.prefs.current.max_gpu_memory_fraction)
            try:
                async with self.pool.worker() as worker:
                    outcome = await worker.run(request, lambda f: setattr(running, "progress", f), running.cancel,
                                           lambda path: self._store_checkpoint(link, running, path))
            finally:
                self.gpus_busy.discard(device)
                await asyncio.gather(*running.uploads, return_exceptions=True)
            if outcome.ok and outcome.files and not running.lost:
                outputs = await self._upload_outputs(link, outcome.files)
        except PanalError as exc:
            # A busy GPU is transient (retry elsewhere); a task we must not run is permanent.
            failure = FailureClass.DEVICE_LOST if exc.code == "no_free_gpu" else FailureClass.UNSUPPORTED
            outcome = Outcome.failed(failure, exc.message, started)
        except Exception as exc:  # the daemon itself must survive anything a task does
            log.exception("running task %s failed", task_id)
            outcome = Outcome.failed(FailureClass.ERROR, f"agent error: {exc}", started)
        finally:
            link.running.pop(task_id, None)
            shutil.rmtree(workdir, ignore_errors=True)
        if not running.lost:
            record = self._sign(assignment, outcome, outputs)
            link.outbox.save(outbox_key(record), record)
            link.pending.append(record)
            link.flush.set()
            if outcome.ok:
                link.done += 1
            else:
                link.failed += 1
                log.warning("task %s failed (%s): %s", task_id, outcome.error_class, outcome.error)
            kind = str(assignment.get("kind"))
            if self.kind_health.record(kind, outcome.ok, outcome.error_class, outcome.error):
                await self._readvertise()

    async def _readvertise(self) -> None:
        """Re-register everywhere so boards match against the kinds this agent accepts now."""
        for link in self.links:
            asyncio.get_running_loop().create_task(self._register(link))

    async def _kind_probe_loop(self) -> None:
        """When a disabled kind's cool-down ends, advertise it again (one task probes it)."""
        disabled = set(self.kind_health.disabled())
        while True:
            await asyncio.sleep(5.0)
            now = set(self.kind_health.disabled())
            if now != disabled:
                disabled = now
                await self._readvertise()

    def _devices(self) -> list[str]:
        """Devices this agent lends: the GPUs that passed the capability probe (and the owner allows)."""
        allowed = self.prefs.current.gpus
        return [str(g["device"]) for g in self.capabilities.get("gpus", [])
                if g.get("device") and (allowed is None or int(g.get("index", -1)) in allowed)]

    def _take_device(self, manifest: Manifest) -> str:
        """One task per GPU: a GPU task gets a free GPU that meets its clauses; otherwise the CPU."""
        if manifest.requires.device == "cpu":
            return "cpu"
        gpus = {str(g.get("device")): g for g in self.capabilities.get("gpus", [])}
        for device in self._devices():
            if device not in self.gpus_busy and manifest.requires.gpu_fits(Gpu.from_dict(gpus[device])):
                self.gpus_busy.add(device)
                return device
        if manifest.requires.device == "gpu" and self._devices():
            raise BadRequest("no free GPU meets this task's requirements right now", code="no_free_gpu")
        return "cpu"

    def _blob_fetcher(self, link: BoardLink) -> Callable[[str, Path], Awaitable[None]]:
        async def fetch(sha: str, dest: Path) -> None:
            path = f"/v1/blobs/{sha}"
            headers = sign_request(self.identity, "GET", path, "", b"")
            await download_blob(link.client.session(), link.address.url, sha, dest, headers)
        return fetch

    async def _fetch_inputs(self, link: BoardLink, manifest: Manifest) -> dict[str, Path]:
        """Download (or find in the bounded local cache) every input blob, verified by its hash."""
        paths = {}
        for name, ref in manifest.inputs.items():
            if ref.blob is None:
                raise BadRequest(f"input {name} was not uploaded", code="input_not_uploaded")
            paths[name] = await self.blobs.get(ref.blob, self._blob_fetcher(link))
        return paths

    def _store_checkpoint(self, link: BoardLink, running: Running, path: str) -> None:
        """Upload a task's checkpoint as a blob; the next heartbeat tells the board, so a retry of
        this task (here or on another agent) resumes from it."""
        async def upload() -> None:
            try:
                sha = await upload_file(link.client.session(), link.address.url, Path(path),
                                        lambda m, p, q, d: sign_request_digest(self.identity, m, p, q, d))
                running.checkpoint = sha
            except (PanalError, OSError, aiohttp.ClientError) as exc:
                log.warning("checkpoint of task %s not stored: %s", running.assignment["task_id"], exc)
            finally:
                await asyncio.to_thread(Path(path).unlink, missing_ok=True)

        task = asyncio.get_running_loop().create_task(upload())
        running.uploads.add(task)
        task.add_done_callback(running.uploads.discard)

    async def _upload_outputs(self, link: BoardLink, files: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Upload output files as blobs; the signed result then names them by sha256."""
        def sign(method: str, path: str, query: str, digest: str) -> dict[str, str]:
            return sign_request_digest(self.identity, method, path, query, digest)

        outputs = {}
        for name, text in files.items():
            path = Path(text)
            sha = await upload_file(link.client.session(), link.address.url, path, sign)
            size = (await asyncio.to_thread(path.stat)).st_size
            outputs[name] = {"sha256": sha, "size": size, "name": path.name}
        return outputs

    def _environment(self) -> dict[str, Any]:
        """What the result was computed with (covered by the signature): versions and devices."""
        caps = self.capabilities
        return {"os": caps.get("os"), "arch": caps.get("arch"), "python": caps.get("python"),
                "torch": caps.get("torch"), "cuda": caps.get("cuda"), "rocm": caps.get("rocm"),
                "cpu": (caps.get("cpu") or {}).get("model"),
                "gpus": [g.get("name") for g in caps.get("gpus") or []]}

    async def _refuse_untrusted(self, link: BoardLink, assignment: dict[str, Any], submitter: str) -> None:
        """Hand a task from an untrusted submitter back (no attempt used) and leave that board alone
        for a while, so agents that do trust the submitter take it."""
        log.warning("refusing job %s on %s: submitter %s is not in the trust store (`panal trust add`)",
                    assignment.get("job_id"), link.address.url, submitter)
        link.cooldown_until = time.monotonic() + UNTRUSTED_COOLDOWN_S
        with contextlib.suppress(PanalError):
            await link.client.call("POST", f"/v1/tasks/{assignment['task_id']}/release",
                                   {"lease_id": assignment["lease_id"]}, retry=False, timeout_s=5.0)

    def _sign(self, assignment: dict[str, Any], outcome: Outcome,
              outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "task_id": assignment["task_id"], "job_id": assignment["job_id"],
            "lease_id": assignment["lease_id"], "attempt": assignment["attempt"], "agent_id": self.identity.id,
            "status": "ok" if outcome.ok else "failed", "started_at": outcome.started_at,
            "finished_at": outcome.finished_at, "metrics": outcome.metrics, "notes": outcome.notes,
            "environment": self._environment(),
        }
        if outcome.ok:
            payload["values"] = outcome.values
            payload["outputs"] = outputs
        else:
            payload["error_class"] = outcome.error_class or FailureClass.ERROR.value
            payload["error"] = outcome.error or ""
        return SignedRecord.sign(self.identity, payload).to_wire()

    # -- the volunteer's rules -----------------------------------------------------------------
    async def _volunteer_loop(self, tick_s: float = 1.0) -> None:
        """Apply the owner's preferences: pause (and SIGSTOP running work) when a rule says so."""
        while True:
            self.prefs.reload_if_changed()
            if any(link.running for link in self.links):
                self.rules.record_compute(tick_s)
            paused, reason = self.rules.evaluate()
            await self._set_paused(reason if paused else None)
            await asyncio.sleep(tick_s)

    async def _set_paused(self, reason: str | None) -> None:
        if reason == self.paused_reason:
            return
        was_paused, self.paused_reason = self.paused_reason is not None, reason
        if reason is not None and not was_paused:
            log.info("pausing: %s", reason)
            self.pool.suspend_all()
        elif reason is None:
            log.info("resuming work")
            self.pool.resume_all()
            async with self.slot_freed:
                self.slot_freed.notify_all()

    # -- control socket (`panal agent pause|resume|status`) -------------------------------------
    def pause(self, for_s: float | None, reason: str) -> None:
        self.rules.pause(for_s, reason or "paused by the owner")
        self.paused_reason = None  # re-evaluated at once below
        paused, why = self.rules.evaluate()
        self.paused_reason = why if paused else None
        self.pool.suspend_all()

    def resume(self) -> None:
        self.rules.resume()
        if not self.rules.evaluate().paused:
            self.paused_reason = None
            self.pool.resume_all()
            asyncio.get_running_loop().create_task(self._notify_slots())

    async def _notify_slots(self) -> None:
        async with self.slot_freed:
            self.slot_freed.notify_all()

    def status(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for extra in self.status_extras:
            extras.update(extra())
        return {
            **extras,
            "state": "paused" if self.paused_reason else ("busy" if self._tasks else "idle"),
            "paused": self.paused_reason is not None, "reason": self.paused_reason,
            "paused_until": self.rules.manual_until.isoformat() if self.rules.manual_until else None,
            "agent_id": self.identity.id, "slots": self.settings.slots, "free_slots": self.free,
            "compute_today_h": round(self.rules.compute_today_s / 3600, 3),
            "disabled_kinds": self.kind_health.disabled(),
            "tasks": [{"id": tid, "kind": r.assignment.get("kind"), "progress": r.progress, "board": link.address.url}
                      for link in self.links for tid, r in link.running.items()],
            "boards": [{"url": link.address.url, "registered": link.registered,
                        "breaker": link.client.breaker.state.value, "outbox": len(link.pending),
                        "refused": link.refused,
                        "done": link.done, "failed": link.failed} for link in self.links],
        }

