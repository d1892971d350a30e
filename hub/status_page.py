"""The public, read-only status page: ``GET /``, its assets, ``/v1/status``, ``/v1/events`` and public job views.

A :class:`StatusFeed` listens to the board (its events and every settled attempt) and keeps what the
board itself does not: recent events, tasks finished per minute over the last hour (credit per agent
is the trust part's, hub/trust/: validated work only), and transitions it notices by looking (agent
went offline, quarantined, released). Live viewers get board events at once and a status snapshot
on every event (debounced) and every ``SNAPSHOT_INTERVAL_S`` (which doubles as the keepalive), as Server-Sent Events.

Privacy: everything here is public. It carries ids (key fingerprints), names, device models and
counts; never keys, manifest parameters or inputs, free-text task errors (they may quote
parameters) or addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from hub.board import Board
from hub.config import HubConfig
from hub.fleet import AgentState
from hub.http import reply
from hub.readmodel import BoardView, job_summary
from hub.records import JobRow, JobState, TaskRow, TaskState

__all__ = ["FEED_KEY", "StatusFeed", "add_status_routes", "agent_state"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: the only files served from STATIC_DIR, with their content types
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
SNAPSHOT_INTERVAL_S = 2.0      # a status snapshot to live viewers at least this often (also their keepalive)
EVENT_DEBOUNCE_S = 0.2         # a burst of board events gives one snapshot
RECENT_EVENTS = 50
RECENT_JOBS = 20               # finished jobs listed beside the active ones
MAX_ACTIVE_JOBS = 100
MAX_PUBLIC_TASKS = 1000
HISTORY_MINUTES = 60
SUBSCRIBER_QUEUE = 64          # frames a slow viewer may lag behind before it is dropped (it reconnects)
SSE_RETRY_MS = 2000
Frame = bytes


def agent_state(agent: AgentState, online: bool) -> str:
    """One of quarantined, offline, busy, idle (a partition of the registered agents)."""
    if agent.refused:
        return "quarantined"
    if not online:
        return "offline"
    return "busy" if agent.running else "idle"


def _frame(event: str, data: Any) -> Frame:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


class StatusFeed:
    """What the status page shows beyond the board's own state; fans frames out to live viewers."""

    def __init__(self, view: BoardView, standing: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.view = view
        #: an agent's credit (validated work only), invalid results and reputation (hub/trust/)
        self.standing = standing or (lambda _agent_id: {})
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.history: dict[int, Counter[str]] = {}          # epoch minute -> {"done": n, "failed": n}
        self.quarantines = 0                                 # agents that entered quarantine
        self.subscribers: set[asyncio.Queue[Frame | None]] = set()
        self._online: set[str] | None = None
        self._refused: dict[str, str | None] = {}
        self._recent_jobs: list[dict[str, Any]] | None = None   # finished jobs from the store; None: reload
        self._final_counts: dict[str, dict[str, int]] = {}      # job id -> its tasks by state, once finished
        self._kick = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    # -- board hooks ----------------------------------------------------------------------------
    def on_event(self, event: dict[str, Any]) -> None:
        """A board listener: record, forward to viewers, and schedule a fresh snapshot."""
        self.events.append(event)
        if event.get("type") == "job_finished":
            self._recent_jobs = None
        self._broadcast(_frame("board", event))
        self._kick.set()

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        """A BoardObserver: count the attempt in its minute (credit is the trust part's: validated work only)."""
        minute = int(self.view.now() // 60)
        self.history.setdefault(minute, Counter())["done" if ok else "failed"] += 1
        for old in [m for m in self.history if m <= minute - HISTORY_MINUTES]:
            del self.history[old]

    def observe(self) -> None:
        """Notice transitions nobody emits: agents going offline and in/out of quarantine."""
        online = {a.row.id for a in self.view.online_agents()}
        now = self.view.now()
        for agent in self.view.agents.values():
            before, after = self._refused.get(agent.row.id), agent.refused
            if after and not before:
                self.quarantines += 1
                self._note({"type": "agent_quarantined", "at": now, "agent": agent.row.id, "name": agent.row.name,
                            "reason": after})
            elif before and not after:
                self._note({"type": "agent_released", "at": now, "agent": agent.row.id, "name": agent.row.name})
            self._refused[agent.row.id] = after
        if self._online is not None:
            for agent_id in sorted(self._online - online):
                left = self.view.agents.get(agent_id)
                self._note({"type": "agent_left", "at": now, "agent": agent_id,
                            "name": left.row.name if left else agent_id})
        self._online = online

    def _note(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._broadcast(_frame("board", event))

    # -- live viewers ---------------------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[Frame | None]:
        queue: asyncio.Queue[Frame | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Frame | None]) -> None:
        self.subscribers.discard(queue)

    def _broadcast(self, frame: Frame) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:  # a viewer that can't keep up: end its stream, it reconnects
                self._end(queue)

    def _end(self, queue: asyncio.Queue[Frame | None]) -> None:
        self.subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)

    def close_streams(self) -> None:
        for queue in list(self.subscribers):
            self._end(queue)

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="panal-status-feed")

    async def stop(self) -> None:
        self.close_streams()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)

    async def _tick_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SNAPSHOT_INTERVAL_S):
                    await self._kick.wait()
                    await asyncio.sleep(EVENT_DEBOUNCE_S)
            self._kick.clear()
            try:
                self.observe()
                if self.subscribers:
                    self._broadcast(_frame("status", await self.summary()))
            except Exception:
                log.exception("status snapshot failed; will retry")

    # -- the summary ----------------------------------------------------------------------------
    async def summary(self) -> dict[str, Any]:
        """The JSON the page renders (a superset of ``Board.status()``)."""
        view = self.view
        self.observe()
        now = view.now()
        base = view.status()
        online_ids = {a.row.id for a in view.online_agents()}
        states = Counter(agent_state(a, a.row.id in online_ids) for a in view.agents.values())
        gpus: Counter[str] = Counter()
        gflops = 0.0
        for agent in view.agents.values():
            if agent.row.id in online_ids:
                gpus.update(g.name for g in agent.caps.gpus)
                gflops += sum(g.gflops_fp32 for g in agent.caps.gpus) + agent.caps.cpu_gflops
        return {
            **base,
            "generated_at": now,
            "snapshot_interval_s": SNAPSHOT_INTERVAL_S,
            "policy": view.policy_name,
            "agents": {**base["agents"], "online": len(online_ids),
                       **{s: states[s] for s in ("idle", "busy", "offline", "quarantined")}},
            "gpus": [{"model": model, "count": n} for model, n in sorted(gpus.items(), key=lambda kv: (-kv[1], kv[0]))],
            "tflops_online": round(gflops / 1000.0, 6),   # to 1 MFLOPS: a CPU fleet is not 0
            "agent_table": [self._agent_row(a, a.row.id in online_ids) for a in view.agents.values()],
            "job_table": await self._job_rows(now),
            "throughput": self._throughput(now),
            "events": list(self.events),
        }

    def _agent_row(self, agent: AgentState, online: bool) -> dict[str, Any]:
        caps = agent.caps
        found = caps.raw.get("cpu")
        cpu: dict[str, Any] = found if isinstance(found, dict) else {}
        running = []
        for task_id in sorted(agent.running):
            task = self.view.task(task_id)
            job = self.view.job(task.job_id) if task is not None else None
            if task is not None and job is not None:
                running.append({"task": task_id, "job": job.id, "job_name": job.name, "idx": task.idx,
                                "progress": task.progress})
        settled = agent.done + agent.failed
        standing = self.standing(agent.row.id)
        return {
            "id": agent.row.id, "name": agent.row.name, "state": agent_state(agent, online),
            "gpus": [{"name": g.name, "backend": g.backend, "vram_gb": g.vram_gb, "gflops_fp32": g.gflops_fp32}
                     for g in caps.gpus],
            "cpu": {"model": str(cpu.get("model") or ""), "cores": caps.cpu_cores, "gflops_fp32": caps.cpu_gflops},
            "memory_gb": caps.memory_gb, "running": running, "done": agent.done, "failed": agent.failed,
            "error_rate": round(agent.failed / settled, 4) if settled else 0.0,
            "credit": round(float(standing.get("credit", 0.0)), 3),
            "invalid_results": int(standing.get("invalid_results", 0)),
            "speed_flag": standing.get("speed_flag"),
            "last_seen": agent.last_seen, "registered_at": agent.row.registered_at, "quarantine": agent.refused,
        }

    async def _job_rows(self, now: float) -> list[dict[str, Any]]:
        view = self.view
        rows = []
        for job in view.active_jobs(MAX_ACTIVE_JOBS):
            counts = view.counts(job.id)
            row = public_job(job_summary(job, counts))
            row["quorum"] = int(job.validation.get("quorum", 1))
            settled = sum(counts.get(s.value, 0) for s in TaskState if s.terminal)
            row["eta_s"] = (now - job.created_at) / settled * (job.n_tasks - settled) if settled else None
            if view.queued(job.id) and not counts.get(TaskState.LEASED.value):
                row["waiting_because"] = view.waiting_because(job.id)
            rows.append(row)
        if self._recent_jobs is None:
            finished = [job for job in await view.list_jobs(None, RECENT_JOBS) if job.state.terminal]
            self._final_counts = {job.id: await self._counts_of_finished(job) for job in finished}
            self._recent_jobs = [{**public_job(job_summary(job, self._final_counts[job.id])), "eta_s": None,
                                  "quorum": int(job.validation.get("quorum", 1))}
                                 for job in finished]
        active = {row["id"] for row in rows}
        return rows + [row for row in self._recent_jobs if row["id"] not in active]

    async def _counts_of_finished(self, job: JobRow) -> dict[str, int]:
        """A finished job's tasks by state: they no longer change, so the store is asked once per job."""
        if job.state == JobState.SUCCEEDED:
            return {TaskState.DONE.value: job.n_tasks}
        known = self._final_counts.get(job.id)
        if known is not None:
            return known
        return dict(Counter(t.state.value for t in await self.view.tasks(job.id)))

    def _throughput(self, now: float) -> list[dict[str, Any]]:
        minute = int(now // 60)
        return [{"minute": m * 60, "done": self.history.get(m, Counter())["done"],
                 "failed": self.history.get(m, Counter())["failed"]}
                for m in range(minute - HISTORY_MINUTES + 1, minute + 1)]


def public_job(view: dict[str, Any]) -> dict[str, Any]:
    """A job summary without free text that may quote parameters (error) or private metadata (labels)."""
    out = {k: v for k, v in view.items() if k not in ("error", "labels")}
    done = view["tasks"].get("done", 0)
    out["progress"] = done / view["n_tasks"] if view["n_tasks"] else 1.0
    return out


FEED_KEY = web.AppKey("status_feed", StatusFeed)


def add_status_routes(app: web.Application, board: Board, config: HubConfig) -> None:
    """Register the page, its assets, /v1/status, /v1/events and /v1/jobs/{job_id}/public."""
    view = board.view
    feed = StatusFeed(view, board.trust.agent_view)
    app[FEED_KEY] = feed

    async def start(_: web.Application) -> None:
        board.add_listener(feed.on_event)
        board.add_observer(feed)
        await feed.start()

    async def shutdown(_: web.Application) -> None:  # before the server waits for open handlers
        feed.close_streams()

    async def cleanup(_: web.Application) -> None:
        await feed.stop()
        board.remove_listener(feed.on_event)
        board.remove_observer(feed)

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers=_ASSET_HEADERS | {"Content-Type": "text/html"})

    async def asset(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no asset {name}")
        return web.FileResponse(STATIC_DIR / name, headers=_ASSET_HEADERS | {"Content-Type": ASSETS[name]})

    async def status(request: web.Request) -> web.Response:
        return reply(request, await feed.summary())

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = feed.subscribe()
        try:
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode() + _frame("status", await feed.summary()))
            while (frame := await queue.get()) is not None:
                await response.write(frame)
        except ConnectionError:  # the viewer went away
            pass
        finally:
            feed.unsubscribe(queue)
        return response

    async def public_job_view(request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        summary = await view.job_view(job_id)  # NotFound -> 404
        tasks = await view.tasks(job_id, MAX_PUBLIC_TASKS)
        names = {a.row.id: a.row.name for a in view.agents.values()}
        return reply(request, {
            "job": public_job(summary),
            "waiting_because": summary.get("waiting_because", []),
            "tasks": [{"idx": t.idx, "state": t.state.value, "attempt": t.attempt, "agent": t.agent_id,
                       "agent_name": names.get(t.agent_id or ""), "progress": t.progress,
                       "error_class": t.error_class, "updated_at": t.updated_at} for t in tasks],
            "truncated": summary["n_tasks"] > len(tasks),
        })

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/jobs/{job_id}/public", public_job_view)


_ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                  "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                             "frame-ancestors 'none'"}
