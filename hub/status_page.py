"""What the public status page shows: the :class:`StatusFeed` (its routes are :mod:`hub.status_routes`).

A :class:`StatusFeed` listens to the board (its events and every settled attempt) and keeps what the
board itself does not: recent events, tasks finished per minute over the last hour, and transitions it
notices by looking (agent went offline, quarantined, released); credit per agent is the trust part's
(hub/trust/: validated work only). Live viewers get board events at once and a status snapshot on
every event (debounced) and every ``SNAPSHOT_INTERVAL_S`` (which doubles as the keepalive), as
Server-Sent Events.

Scale (:mod:`hub.status_snapshot`): the snapshot is built once per interval by one task, not per request
or per viewer; every viewer gets the same encoded frame, ``/v1/status`` the same bytes, and the agent and
job tables are paged and searched over the snapshot. Per kind (:mod:`hub.status_kinds`): backlog, tasks
in progress, recent run times and failure rate, and why work waits (:mod:`hub.status_waiting`, bounded
per snapshot); a 24-hour history in 10-minute buckets is kept in the store (:mod:`hub.status_history`).
Live viewers are capped (``max_status_viewers``): one more gets a 503 with Retry-After, and the page then
polls ``/v1/status`` instead.

Privacy: everything here is public. It carries ids (key fingerprints), names, device models and
counts; never keys, manifest parameters or inputs, free-text task errors (they may quote
parameters) or addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from hub.fleet import AgentState
from hub.readmodel import BoardView
from hub.records import JobRow, TaskRow, TaskState
from hub.status_history import StatusHistory
from hub.status_kinds import KindStats
from hub.status_recent import RecentJobs
from hub.status_rows import active_job_row, agent_row, agent_state, public_job
from hub.status_snapshot import Page, Snapshot, agent_order, page_of
from hub.status_waiting import WaitingExplainer
from hub.store import Store
from jobs.wire import JSON, encode_body

__all__ = ["FEED_KEY", "StatusFeed", "agent_state", "public_job"]

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 2.0      # a status snapshot to live viewers at least this often (also their keepalive)
EVENT_DEBOUNCE_S = 0.2         # a burst of board events gives one snapshot
RECENT_EVENTS = 50
HISTORY_MINUTES = 60
SUBSCRIBER_QUEUE = 64          # frames a slow viewer may lag behind before it is dropped (it reconnects)
#: a board with at most this many agents and active jobs together rebuilds a stale snapshot for the request
#: that finds it (cheap: it answers with what just happened); a larger one only in the feed's own task
INLINE_BUILD_MAX = 1000
BUILD_CHUNK = 2000             # agents handled between two yields to the event loop while building
BUILD_DUTY = 0.1               # the feed's task spends at most this share of the loop building snapshots
Frame = bytes


def _frame(event: str, data: Any) -> Frame:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


class StatusFeed:
    """What the status page shows beyond the board's own state; fans frames out to live viewers."""

    def __init__(self, view: BoardView, max_viewers: int = 100,
                 standing: Callable[[str], dict[str, Any]] | None = None, store: Store | None = None) -> None:
        self.view = view
        self.kinds = KindStats()                             # recent attempts per kind
        self.day = StatusHistory(store)                      # 24 hours in 10-minute buckets, kept in the store
        self.waiting = WaitingExplainer(view.waiting_because)
        self._searchable: dict[str, tuple[str, str]] = {}    # agent id -> (its name, its search text)
        #: an agent's credit (validated work only), invalid results and reputation (hub/trust/)
        self.standing = standing or (lambda _agent_id: {})
        self.max_viewers = max_viewers
        self.snapshot: Snapshot | None = None
        self._build_lock = asyncio.Lock()
        self._changes = 0                                    # board events and settled attempts seen
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.history: dict[int, Counter[str]] = {}          # epoch minute -> {"done": n, "failed": n}
        self.quarantines = 0                                 # agents that entered quarantine
        self.subscribers: set[asyncio.Queue[Frame | None]] = set()
        self._online: set[str] | None = None
        self._refused: dict[str, str | None] = {}
        self.recent = RecentJobs(view)                       # finished jobs, from the store once per finish
        self._kick = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    # -- board hooks ----------------------------------------------------------------------------
    def on_event(self, event: dict[str, Any]) -> None:
        """A board listener: record, forward to viewers, and schedule a fresh snapshot."""
        self.events.append(event)
        self._changes += 1
        if event.get("type") == "job_finished":
            self.recent.forget()
        if self.subscribers:   # (framed only for live viewers: a JSON encode per board event otherwise)
            self._broadcast(_frame("board", event))
        self._kick.set()

    def attempt_settled(self, agent_id: str, job: JobRow, task: TaskRow, ok: bool, failure: str | None,
                        metrics: dict[str, Any]) -> None:
        """A BoardObserver: count the attempt in its minute (credit is the trust part's: validated work only)."""
        self._changes += 1
        self.kinds.settled(job, ok, metrics)
        self.day.count(self.view.now(), ok)
        minute = int(self.view.now() // 60)
        self.history.setdefault(minute, Counter())["done" if ok else "failed"] += 1
        for old in [m for m in self.history if m <= minute - HISTORY_MINUTES]:
            del self.history[old]

    def observe(self) -> None:
        """Notice transitions nobody emits: agents going offline and in/out of quarantine."""
        online = {a.row.id for a in self.view.online_agents()}
        now = self.view.now()
        for agent in list(self.view.agents.values()):
            self._observe_agent(agent, now)
        self._observe_online(online, now)

    def _observe_agent(self, agent: AgentState, now: float) -> None:
        before, after = self._refused.get(agent.row.id), agent.refused
        if after and not before:
            self.quarantines += 1
            self._note({"type": "agent_quarantined", "at": now, "agent": agent.row.id, "name": agent.row.name,
                        "reason": after})
        elif before and not after:
            self._note({"type": "agent_released", "at": now, "agent": agent.row.id, "name": agent.row.name})
        self._refused[agent.row.id] = after

    def _observe_online(self, online: set[str], now: float) -> None:
        if self._online is not None:
            for agent_id in sorted(self._online - online):
                left = self.view.agents.get(agent_id)
                self._note({"type": "agent_left", "at": now, "agent": agent_id,
                            "name": left.row.name if left else agent_id})
        self._online = online

    def _note(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changes += 1
        if self.subscribers:
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
        try:
            await self.day.load(self.view.now())
        except Exception:
            log.exception("could not read the status history; it starts empty")
        self._ticker = asyncio.create_task(self._tick_forever(), name="panal-status-feed")

    async def stop(self) -> None:
        self.close_streams()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        try:
            await self.day.flush(self.view.now(), force=True)
        except Exception:
            log.exception("could not write the status history")

    async def _tick_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SNAPSHOT_INTERVAL_S):
                    await self._kick.wait()
                    await asyncio.sleep(EVENT_DEBOUNCE_S)
            self._kick.clear()
            try:
                built = await self.refresh()
                if self.subscribers:
                    self._broadcast(built.frame)
                # a costly build (a huge fleet) is spaced out so that building stays a small share of the loop
                await asyncio.sleep(built.build_s * (1 / BUILD_DUTY - 1))
            except Exception:
                log.exception("status snapshot failed; will retry")

    # -- the snapshot ---------------------------------------------------------------------------
    def _fingerprint(self) -> tuple[Any, ...]:
        """Cheap counters that change whenever the status would: a snapshot built under others is stale."""
        view = self.view
        return sum(view.stats.values()), len(view.agents), view.active_count(), self._changes

    async def current(self) -> Snapshot:
        """The latest snapshot; rebuilt here only when it is stale and the board is small (cheap to build)."""
        snap = self.snapshot
        if snap is None:
            return await self.refresh()
        stale = snap.fingerprint != self._fingerprint() or \
            asyncio.get_running_loop().time() - snap.built_at >= SNAPSHOT_INTERVAL_S
        if stale and len(self.view.agents) + self.view.active_count() <= INLINE_BUILD_MAX:
            return await self.refresh()
        return snap

    async def refresh(self) -> Snapshot:
        """Build a snapshot (one build at a time; a caller that waited for one gets it if still current)."""
        seen = self.snapshot
        async with self._build_lock:
            if self.snapshot is not seen and self.snapshot is not None \
                    and self.snapshot.fingerprint == self._fingerprint():
                return self.snapshot
            self.snapshot = await self._build()
            return self.snapshot

    async def summary(self) -> dict[str, Any]:
        """The default view (first pages of both tables): what ``/v1/status`` answers with no parameters."""
        return (await self.current()).body

    async def page(self, snap: Snapshot, page: Page) -> dict[str, Any]:
        """The snapshot with the asked-for pages of the agent and job tables (rows read live)."""
        ids, agent_page = page_of(snap.agents_matching(*page.agent_search), page.agents_offset, page.agents_limit)
        agents = self.view.agents
        online = snap.base["online_ids"]
        agent_rows = [agent_row(self.view, agents[i], i in online, self.standing(i)) for i in ids if i in agents]
        ids, job_page = page_of(snap.jobs_matching(*page.job_search), page.jobs_offset, page.jobs_limit)
        job_rows, recent = [], self.recent.rows
        for job_id in ids:
            live = self.view.job(job_id)
            row = recent.get(job_id) if live is None else \
                active_job_row(self.view, live, snap.base["generated_at"], self.waiting.job_lines)
            if row is not None:
                job_rows.append(row)
        body = {k: v for k, v in snap.base.items() if k != "online_ids"}
        return {**body, "agent_table": agent_rows, "agent_page": agent_page,
                "job_table": job_rows, "job_page": job_page}

    async def _build(self) -> Snapshot:
        started = time.perf_counter()
        view = self.view
        fingerprint = self._fingerprint()
        now = view.now()
        agents = list(view.agents.values())          # the fleet now: agents joining meanwhile wait for the next
        online_ids = {a.row.id for a in view.online_agents()}
        by_agent: dict[str, str] = {}
        busy: list[tuple[str, str]] = []
        gpus: Counter[str] = Counter()
        gflops = 0.0
        for start in range(0, len(agents), BUILD_CHUNK):
            for agent in agents[start:start + BUILD_CHUNK]:
                self._observe_agent(agent, now)
                online = agent.row.id in online_ids
                by_agent[agent.row.id] = state = agent_state(agent, online)
                if state == "busy":
                    busy.append((agent.row.name, agent.row.id))
                if online:
                    if agent.caps.gpus:
                        gpus.update(g.name for g in agent.caps.gpus)
                        gflops += sum(g.gflops_fp32 for g in agent.caps.gpus)
                    gflops += agent.caps.cpu_gflops
            await asyncio.sleep(0)                   # a big fleet: leases get through between chunks
        self._observe_online(online_ids, now)
        states = Counter(by_agent.values())
        order = agent_order(by_agent, busy)
        base = {"agents": {"registered": len(by_agent)}, "jobs": {"active": view.active_count()},
                "tasks": {state.value: n for state, n in view.task_totals().items()}, "stats": dict(view.stats)}
        await self.recent.load()
        active_jobs = view.active_jobs()
        active = [job.id for job in active_jobs]
        active_set = set(active)
        kinds = await self._work(active_jobs, online_ids, now)
        snap = Snapshot(base={
            **base,
            "generated_at": now,
            "snapshot_interval_s": SNAPSHOT_INTERVAL_S,
            "policy": view.policy_name,
            "agents": {**base["agents"], "online": len(online_ids),
                       **{s: states[s] for s in ("idle", "busy", "offline", "quarantined")}},
            "gpus": [{"model": model, "count": n} for model, n in sorted(gpus.items(), key=lambda kv: (-kv[1], kv[0]))],
            "tflops_online": round(gflops / 1000.0, 6),   # to 1 MFLOPS: a CPU fleet is not 0
            "throughput": self._throughput(now),
            "events": list(self.events),
            "kinds": kinds,
            "history": self.day.columns(now),
            "online_ids": online_ids,
        }, agent_ids=order,
            job_ids=active + [i for i in self.recent.rows if i not in active_set],
            fingerprint=fingerprint, built_at=asyncio.get_running_loop().time(),
            agent_states=by_agent, agent_text=self._search_text,
            job_index={**{r["id"]: (f"{r['name']} {r['id']}".lower(), r["state"], r["kind"])
                          for r in self.recent.rows.values()},
                       **{j.id: (f"{j.name} {j.id}".lower(), j.state.value, j.kind) for j in active_jobs}})
        snap.body = await self.page(snap, Page())
        snap.json = encode_body(snap.body, JSON)
        snap.frame = b"event: status\ndata: " + snap.json + b"\n\n"
        snap.build_s = time.perf_counter() - started
        return snap

    def _search_text(self, agent_id: str) -> str:
        """What an agent search looks in: its name and id, lowercased (kept until it is renamed)."""
        agent = self.view.agents.get(agent_id)
        if agent is None:
            return ""
        known = self._searchable.get(agent_id)
        if known is None or known[0] != agent.row.name:
            known = self._searchable[agent.row.id] = (agent.row.name, f"{agent.row.name} {agent.row.id}".lower())
        return known[1]

    async def _work(self, active: list[JobRow], online: set[str], now: float) -> list[dict[str, Any]]:
        """The per-kind table with why work waits (explained per group of jobs, bounded), and the history's
        sample of the fleet and backlog."""
        view, waiting = self.view, self.waiting
        waiting.begin()
        counted = [(job, view.task_counts(job.id)) for job in active]
        for job, counts in counted:
            if counts.get(TaskState.QUEUED):
                waiting.add_job(job, view.requirements(job.id), counts[TaskState.QUEUED])
        if waiting.groups:                    # nothing queued: no pass over the fleet
            connected = view.connected_agents()
            for start in range(0, len(connected), BUILD_CHUNK):
                waiting.fold(connected[start:start + BUILD_CHUNK])
                await asyncio.sleep(0)
            waiting.explain(now)
        kinds = set(self.kinds.kinds) | {job.kind for job, _ in counted}
        table = self.kinds.table(counted, {kind: waiting.kind_lines(kind) for kind in kinds})
        self.day.sample(now, len(online), sum(counts.get(TaskState.QUEUED, 0) for _, counts in counted))
        try:
            await self.day.flush(now)
        except Exception:
            log.exception("could not write the status history; will retry")
        return table

    def _throughput(self, now: float) -> list[dict[str, Any]]:
        minute = int(now // 60)
        return [{"minute": m * 60, "done": self.history.get(m, Counter())["done"],
                 "failed": self.history.get(m, Counter())["failed"]}
                for m in range(minute - HISTORY_MINUTES + 1, minute + 1)]


FEED_KEY = web.AppKey("status_feed", StatusFeed)
