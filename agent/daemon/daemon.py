"""The volunteer daemon: pull work from every known board, run it in warm workers, return it signed.

One :class:`~agent.daemon.board_link.BoardLink` per board runs its loops; an
:class:`~agent.daemon.execution.Executor` runs each leased task. Slots are shared by all boards;
each board loop reserves its share before it polls. On SIGTERM the daemon stops leasing, lets
running tasks finish for ``drain_s``, hands back the rest, and delivers what it can.

Boards come and go while it runs (LAN peers): :meth:`Daemon.add_board` takes the hooks an owner of
a board plugs in (whose work to run, how the board's health is heard, how often to poll it), so LAN
mode never touches a link's insides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from agent.client.blobcache import BlobCache
from agent.client.board import BoardClient
from agent.client.breaker import Breaker
from agent.daemon.board_link import BoardLink
from agent.daemon.devices import Devices
from agent.daemon.execution import Executor
from agent.daemon.hooks import CodeConsent, HealthListener, HoldOff, StartHook, StatusSource, SubmitterCheck
from agent.daemon.kind_health import KindHealth
from agent.daemon.outbox import Outbox
from agent.daemon.pause_control import PauseControl
from agent.daemon.settings import DaemonSettings
from agent.daemon.slots import Slots
from agent.daemon.status_summary import summary
from agent.daemon.threads import lent_threads
from agent.engine.runner import WorkerPool
from agent.engine.sandbox import probe as probe_sandbox
from agent.engine.sandbox_pool import SandboxPool
from agent.host import capabilities
from agent.host.capabilities_probe import detect_capabilities
from agent.host.home import AgentHome
from agent.volunteer.control import ControlServer, default_socket_path
from agent.volunteer.gpu_use import detect_gpu_source
from agent.volunteer.naming import agent_name
from agent.volunteer.pause_rules import PauseRules, SystemLoad
from agent.volunteer.preferences import PreferencesFile
from hub.background import run_every
from jobs.protocol import Assignment
from jobs.protocol_registration import Registration
from jobs.requirements import Capabilities
from security.errors import Forbidden, PanalError
from security.identity import Identity
from security.tls import BoardAddress

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

KIND_PROBE_S = 5.0   # how often a kind disabled by its breaker is checked for the end of its cool-down
WORKER_RETIRE_CHECK_S = 2.0   # how often idle workers are looked at (worker_idle_minutes)


class Daemon:
    def __init__(self, home: AgentHome, boards: list[BoardAddress], settings: DaemonSettings,
                 allow_no_board: bool = False) -> None:
        if not boards and not allow_no_board:
            raise Forbidden("this agent has joined no board: run `panal agent join JOIN_URL` first",
                            code="no_board")
        self.home = home
        self.settings = settings
        self.identity: Identity = home.agent_identity()
        self.name = agent_name(home.root, self.identity.id, settings.name)   # never the hostname
        self.boards = boards
        self.links: list[BoardLink] = []
        self.prefs = PreferencesFile(home.root / "prefs.yaml")
        self.rules = PauseRules(lambda: self.prefs.current, SystemLoad(), usage_path=home.root / "usage.json")
        self.settings.slots = settings.slots or self.prefs.current.max_concurrent_tasks
        self.slots = Slots(self.settings.slots, lambda: self.paused_reason is None)
        self.pool = WorkerPool(self.settings.slots)
        # submitter code runs only here, one fresh sandbox per task (None: no working sandbox)
        self.sandboxes = SandboxPool(home.work, exclude=[home.root]) if probe_sandbox().available else None
        self.kind_health = KindHealth()
        self.capabilities = capabilities.basic(settings.capabilities)
        self.pause_control = PauseControl(self)   # the rules applied each tick: stop, continue, hand back
        self.devices = Devices(lambda: list(self.capabilities.get("gpus", [])), lambda: self.prefs.current.gpus,
                               lambda: self.prefs.current.exclude_gpus, lambda: self.pause_control.gpu_paused)
        self.executor = Executor(
            identity=self.identity, work=home.work, pool=self.pool, sandboxes=self.sandboxes,
            blobs=BlobCache(home.root / "blobs", settings.blob_cache_bytes),
            devices=self.devices,
            threads=lent_threads(settings.threads, self.prefs.current.cpu_threads, os.cpu_count() or 1,
                                 self.settings.slots),
            gpu_memory_fraction=lambda: self.prefs.current.max_gpu_memory_fraction,
            capabilities=lambda: self.capabilities, max_memory_gb=lambda: self.prefs.current.max_memory_gb)
        self._advertised = self._advertised_prefs()
        self.stopping = False
        self.paused_reason: str | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._disabled_kinds: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Extension points (LAN mode): coroutines run once the daemon is up, and extra status fields.
        self.on_start: list[StartHook] = []
        # whose code runs from a board given at start, by URL (`panal up`: its owner's); else joined --allow-code
        self.board_code: dict[str, CodeConsent] = {}
        self.status_extras: list[StatusSource] = []

    # -- boards come and go (LAN peers) ---------------------------------------------------------
    def add_board(self, address: BoardAddress, *, trusted: SubmitterCheck | None = None, retry_for_s: float = 10.0,
                  on_health: HealthListener | None = None, hold_off: HoldOff | None = None,
                  code: CodeConsent | None = None) -> BoardLink:
        """Start pulling from a board (the link already pulling from its URL, if any).

        ``trusted`` (a submitter-id check) restricts whose work runs; ``on_health`` hears each call
        to the board (answered or not); ``hold_off`` says how long to wait before each lease request;
        ``code`` whose own code runs (default: the board's submitters if it was joined ``--allow-code``).
        """
        for link in self.links:
            if link.address.url == address.url:
                return link
        client = BoardClient(address, self.identity, insecure=self.settings.insecure, retry_for_s=retry_for_s,
                             breaker=Breaker(name=address.url), on_health=on_health)
        if code is None:
            code = self.board_code.get(address.url) or CodeConsent(any_submitter=address.url in self.home.code_boards())
        link = BoardLink(self, address, client, Outbox(self.home.outbox, address.url), trusted=trusted,
                         hold_off=hold_off, code=code)
        if self.sandboxes is not None and (code.any_submitter or code.keys()):
            self.sandboxes.prewarm()   # code may come: have a sandbox started before it does
        self.links.append(link)
        link.start()
        return link

    async def remove_board(self, url: str) -> None:
        """Stop leasing from a board (a LAN peer left). Running tasks finish; results stay in the outbox."""
        for link in list(self.links):
            if link.address.url == url:
                await link.stop()
                self.links.remove(link)
                if not link.running:
                    await link.client.close()

    @property
    def board_count(self) -> int:
        return len(self.links)

    @property
    def tasks_running(self) -> int:
        """Tasks running now, on every board."""
        return sum(len(link.running) for link in self.links)

    # -- life cycle -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.capabilities = await detect_capabilities(self.home, self.settings.capabilities)
        if self.capabilities.get("gpus"):
            self.pause_control.gpu_source = await asyncio.to_thread(detect_gpu_source)
        if self.prefs.current.worker_idle_minutes is None:   # the volunteer keeps workers warm
            await self.pool.warm()
        self._loops.append(run_every(WORKER_RETIRE_CHECK_S, self._retire_idle_workers, "idle workers"))
        control = ControlServer(default_socket_path(), self)
        try:
            await control.start()
        except PanalError as exc:
            log.warning("control socket unavailable (`panal agent status` will not work): %s", exc.message)
        self._loops.append(asyncio.create_task(self._volunteer_loop(), name="volunteer"))
        self._disabled_kinds = set(self.kind_health.disabled())
        self._loops.append(run_every(KIND_PROBE_S, self._probe_kinds, "kind probe"))
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
        await asyncio.gather(*(link.stop_leasing() for link in self.links))
        if self._tasks:
            log.info("draining %d running task(s) for up to %.0f s", len(self._tasks), self.settings.drain_s)
            _, still = await asyncio.wait(self._tasks, timeout=self.settings.drain_s)
            for link in self.links:
                await link.hand_back_running()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        for link in self.links:
            if link.results.pending:
                await link.results.deliver(retry=False)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, *(link.stop() for link in self.links), return_exceptions=True)
        await self.pool.close()
        if self.sandboxes is not None:
            await self.sandboxes.close()
        for link in self.links:
            await link.client.close()

    # -- what the board links ask of the daemon -------------------------------------------------
    def registration(self) -> Registration:
        caps = dict(self.capabilities)
        caps["kinds"] = self.kind_health.advertised(list(caps.get("kinds") or []))
        caps["slots"] = self.settings.slots   # the board leases it at most this many tasks at once
        # only the GPUs the volunteer lends, and never their UUIDs (a stable hardware fingerprint)
        caps["gpus"] = [{k: v for k, v in g.items() if k != "uuid"} for g in self.devices.advertised()
                        if g.get("device") not in self.pause_control.gpu_withdrawn]
        ceiling = self.prefs.current.max_memory_gb
        if ceiling is not None:   # the board sends no task whose memory cap is larger
            caps["max_memory_gb"] = ceiling
        return Registration(self.identity.public, self.name, Capabilities.from_dict(caps))

    def start_task(self, link: BoardLink, assignment: Assignment) -> None:
        task = asyncio.create_task(self._execute(link, assignment), name=f"task {assignment.task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, link: BoardLink, assignment: Assignment) -> None:
        try:
            outcome = await self.executor.run(link, assignment)
            if outcome is not None and self.kind_health.record(assignment.kind, outcome.ok,
                                                               outcome.error_class, outcome.error):
                self._readvertise()
        finally:
            await self.slots.release(1)

    async def _retire_idle_workers(self) -> None:
        """A warm worker that waited ``worker_idle_minutes`` without work exits: an idle agent is its daemon."""
        minutes = self.prefs.current.worker_idle_minutes
        if minutes is not None:
            await self.pool.retire_idle(minutes * 60)
            if self.sandboxes is not None:
                await self.sandboxes.retire_idle(minutes * 60)

    # -- kind health ----------------------------------------------------------------------------
    def readvertise(self) -> None:
        """Tell every board again what this agent accepts (e.g. the owner trusted a key for code)."""
        self._readvertise()

    def _readvertise(self) -> None:
        """Re-register everywhere so boards match against the kinds this agent accepts now."""
        for link in self.links:
            asyncio.get_running_loop().create_task(link.register())

    async def _probe_kinds(self) -> None:
        """When a disabled kind's cool-down ends, advertise it again (one task probes it)."""
        now = set(self.kind_health.disabled())
        if now != self._disabled_kinds:
            self._disabled_kinds = now
            self._readvertise()

    # -- the volunteer's rules -----------------------------------------------------------------
    async def _volunteer_loop(self, tick_s: float = 1.0) -> None:
        """Apply the owner's preferences: pause (and SIGSTOP running work) when a rule says so."""
        last = time.monotonic()
        while True:
            now = time.monotonic()
            await self.volunteer_tick(now - last)
            last = now
            await asyncio.sleep(tick_s)

    def _advertised_prefs(self) -> tuple[Any, ...]:
        prefs = self.prefs.current
        return prefs.max_memory_gb, prefs.gpus, prefs.exclude_gpus

    async def volunteer_tick(self, elapsed_s: float) -> None:
        """One look at the rules (:mod:`agent.daemon.pause_control`): count the compute of the last
        ``elapsed_s``, pause or resume, stop and continue workers, hand back the tasks of a long pause."""
        self.prefs.reload_if_changed()
        if self._advertised_prefs() != self._advertised:   # tell the boards what we lend now
            self._advertised = self._advertised_prefs()
            self._readvertise()
        reason = await self.pause_control.decide(elapsed_s)
        await self._set_paused(reason)
        self.pause_control.apply()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a background task of this daemon's work (a shutdown waits for it)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_paused(self, reason: str | None) -> None:
        if reason == self.paused_reason:
            return
        was_paused, self.paused_reason = self.paused_reason is not None, reason
        if reason is not None and not was_paused:
            log.info("pausing: %s", reason)
            self.pool.suspend_all()
            if self.sandboxes is not None:
                self.sandboxes.suspend_all()
        elif reason is None:
            log.info("resuming work")
            self.pause_control.resume_workers()
            await self.slots.wake()

    # -- control socket (`panal agent pause|resume|status`) -------------------------------------
    def pause(self, for_s: float | None, reason: str) -> None:
        self.rules.pause(for_s, reason or "paused by the owner")
        self.paused_reason = None  # re-evaluated at once below
        paused, why = self.rules.evaluate()
        self.paused_reason = why if paused else None
        self.pool.suspend_all()
        if self.sandboxes is not None:
            self.sandboxes.suspend_all()

    def resume(self) -> None:
        self.rules.resume()
        if not self.rules.evaluate().paused:
            self.paused_reason = None
            self.pause_control.resume_workers()
            asyncio.get_running_loop().create_task(self.slots.wake())

    def status(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for extra in self.status_extras:
            extras.update(extra())
        return {
            **extras,
            "state": "paused" if self.paused_reason else ("busy" if self._tasks else "idle"),
            "paused": self.paused_reason is not None, "reason": self.paused_reason,
            "paused_until": self.rules.manual_until.isoformat() if self.rules.manual_until else None,
            # A slot reserved by a board's long poll is still free for work: count only running tasks.
            "agent_id": self.identity.id, "slots": self.settings.slots, "workers": self.pool.alive,
            "free_slots": max(0, self.settings.slots - len(self._tasks)),
            "compute_today_h": round(self.rules.compute_today_s / 3600, 3),
            "gpu_paused": dict(self.pause_control.gpu_paused),   # device -> why GPU work there waits
            "disabled_kinds": self.kind_health.disabled(),
            "tasks": [{"id": tid, "kind": r.assignment.kind, "progress": r.progress, "board": link.address.url}
                      for link in self.links for tid, r in link.running.items()],
            "boards": [link.status() for link in self.links],
            **summary(self.links, running=len(self._tasks), paused_reason=self.paused_reason, name=self.name),
        }
