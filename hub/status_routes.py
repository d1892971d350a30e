"""The status page's HTTP routes: ``GET /``, its assets, ``/v1/status``, ``/v1/events`` and public job views.

Everything they serve comes from the one :class:`hub.status_page.StatusFeed` (its snapshot, its frames);
see there for what is public and why, and :mod:`hub.status_snapshot` for paging. A search the snapshot has
not answered yet is a pass over a table (up to the whole fleet), and a page of 500 rows reads them all live,
so on a hub strangers reach each source address gets ``status_queries_per_min`` of those (a 429 with
``Retry-After`` past that): anyone can type new texts faster than the board should walk 10k agents.
"""

from __future__ import annotations

import math
from pathlib import Path

from aiohttp import web

from hub.board import Board
from hub.config import HubConfig
from hub.fleet import AgentState
from hub.http import reply, reply_type
from hub.ratelimit import RateLimiter, source_key
from hub.status_page import FEED_KEY, StatusFeed, public_job
from hub.status_snapshot import FREE_PAGE_ROWS, Page
from jobs.wire import JSON
from security.errors import TooManyRequests

__all__ = ["add_status_routes"]

STATIC_DIR = Path(__file__).parent / "static"
#: the only files served from STATIC_DIR, with their content types
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_PUBLIC_TASKS = 1000
SSE_RETRY_MS = 2000
VIEWER_RETRY_AFTER_S = 30      # what a viewer refused for the cap is told (it polls /v1/status meanwhile)


def add_status_routes(app: web.Application, board: Board, config: HubConfig) -> None:
    """Register the page, its assets, /v1/status, /v1/events and /v1/jobs/{job_id}/public."""
    view = board.view
    # searches the snapshot's cache can't answer and big pages, per source address (Snapshot.costly); off on
    # a hub only this machine's processes reach (hub/config.py ``loopback_only``)
    queries_limit = None if config.loopback_only or config.status_queries_per_min <= 0 else \
        RateLimiter(config.status_queries_per_min, config.status_query_burst)
    feed = StatusFeed(view, config.max_status_viewers, board.trust.agent_view, board.store)
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
        page = Page.from_query(request)
        snap = await feed.current()
        if not page.is_default:
            if (cost := snap.costly(page)) and queries_limit is not None:
                address = source_key(request.remote)
                if (wait_s := queries_limit.retry_after(address)) > 0:
                    raise TooManyRequests(
                        f"too many new searches or big pages from {address}: this board serves at most "
                        f"{config.status_queries_per_min:g} a minute per address (a search is a pass over its "
                        f"whole fleet); retry in {math.ceil(wait_s)} s. Repeating a search, paging through one "
                        f"{FREE_PAGE_ROWS // 2} rows at a time, and the default view are not counted",
                        retry_after_s=wait_s, code="too_many_queries")
                for _ in range(cost):
                    queries_limit.take(address)
            return reply(request, await feed.page(snap, page))
        if reply_type(request) == JSON:
            return web.Response(body=snap.json, content_type=JSON)   # the bytes every reader shares
        return reply(request, snap.body)

    async def events(request: web.Request) -> web.StreamResponse:
        if len(feed.subscribers) >= feed.max_viewers:
            refused = reply(request, {
                "error": "too_many_viewers",
                "message": f"this board streams its status to at most {feed.max_viewers} viewers at once; "
                           f"retry in {VIEWER_RETRY_AFTER_S} s, or poll /v1/status meanwhile"}, 503)
            refused.headers["Retry-After"] = str(VIEWER_RETRY_AFTER_S)
            return refused
        queue = feed.subscribe()   # counted before the first await: N+1 at once cannot all get in
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode() + (await feed.current()).frame)
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
        agents = view.agents   # the tasks' own agents, not a map of the whole fleet per request
        return reply(request, {
            "job": public_job(summary),
            "waiting_because": summary.get("waiting_because", []),
            "tasks": [{"idx": t.idx, "state": t.shown_state, "attempt": t.attempt, "agent": t.agent_id,
                       "agent_name": _name(agents.get(t.agent_id or "")), "progress": t.progress,
                       "error_class": t.error_class, "updated_at": t.updated_at} for t in tasks],
            "truncated": summary["n_tasks"] > len(tasks),
        })

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/jobs/{job_id}/public", public_job_view)


def _name(agent: AgentState | None) -> str | None:
    return agent.row.name if agent is not None else None


_ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                  "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                             "frame-ancestors 'none'"}
