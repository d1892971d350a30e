"""The board's HTTP API (aiohttp): routes, body codec and the error mapping.

Replies are JSON (what a person with curl reads) unless the client asks for msgpack: by ``Accept``, or,
when it states no preference, by sending a msgpack body. Request bodies may be either.
Every error leaves as ``{"error": code, "message": ...}`` with the status of its exception class;
nothing else (no traceback) ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from hub.auth import Authenticator
from hub.blob_routes import add_blob_routes
from hub.board import Board
from hub.config import HubConfig
from hub.metrics import add_metrics
from hub.openapi import add_openapi
from hub.records import JobState
from hub.status_page import add_status_routes
from jobs.wire import JSON, MSGPACK, decode_body, encode_body
from security.errors import BadRequest, Forbidden, NotFound, PanalError, PayloadTooLarge
from security.identity import PublicKey
from security.records import SignedRecord

__all__ = ["BOARD_KEY", "create_app", "reply"]

log = logging.getLogger(__name__)
BOARD_KEY = web.AppKey("board", Board)
AUTH_KEY = web.AppKey("auth", Authenticator)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _reply_type(request: web.Request) -> str:
    """The first of msgpack/JSON that ``Accept`` names; else what the body was sent as; else JSON."""
    accept = request.headers.get("Accept", "")
    named = [t for t in (MSGPACK, JSON) if t in accept]
    if named:
        return min(named, key=accept.index)
    return MSGPACK if request.body_exists and request.content_type == MSGPACK else JSON


def reply(request: web.Request, value: Any, status: int = 200) -> web.Response:
    content_type = _reply_type(request)
    return web.Response(body=encode_body(value, content_type), status=status, content_type=content_type)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PanalError as exc:
        return reply(request, exc.to_body(), exc.status)
    except ConnectionError:  # the client went away mid-request (e.g. an interrupted upload)
        raise
    except web.HTTPRequestEntityTooLarge as exc:
        err = PayloadTooLarge(f"request body too large: {exc.text}", code="body_too_large")
        return reply(request, err.to_body(), err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {"error": exc.reason.lower().replace(" ", "_"), "message": exc.text or exc.reason}
        return reply(request, body, exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return reply(request, {"error": "internal", "message": "internal error (logged on the board)"}, 500)


async def _body(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    data = await request.read()
    value = decode_body(data, request.content_type if request.body_exists else "")
    if not isinstance(value, dict):
        raise BadRequest("request body must be a map", code="malformed_body")
    return data, value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"{name}: expected a number, got {value!r}")
    return float(value)


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise BadRequest(f"{name}: expected a list, got {type(value).__name__}")
    return value


class Api:
    def __init__(self, board: Board, auth: Authenticator, config: HubConfig) -> None:
        self.board, self.auth, self.config = board, auth, config

    # -- agents ---------------------------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        key_text = body.get("public_key")
        if not isinstance(key_text, str):
            raise BadRequest("public_key: expected the agent's key as text (ed25519:...)")
        key = PublicKey.parse(key_text)
        await self.auth.verify(request, extra_key=key, body=data)
        if not self.config.open_registration and key.id not in self.board.view.agents:
            raise Forbidden(
                f"registration is closed on this board; ask its admin to admit agent {key.id}",
                code="registration_closed")
        caps = body.get("capabilities", {})
        if not isinstance(caps, dict):
            raise BadRequest("capabilities: expected a map")
        agent = await self.board.register_agent(key, str(body.get("name", "")), caps)
        return reply(request, {"agent_id": agent.row.id, "lease_ttl_s": self.config.lease_ttl_s,
                               "max_poll_wait_s": self.config.max_poll_wait_s,
                               "max_tasks_per_lease": self.config.max_tasks_per_lease})

    async def lease(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        agent_id = await self.auth.agent(request, data)
        outcomes = await self.board.accept(agent_id, _list(body, "results"))
        tasks = await self.board.lease(agent_id, int(_number(body, "slots", 1)),
                                       _number(body, "wait_s", 0.0))
        refused = self.board.view.agents[agent_id].refused
        return reply(request, {"tasks": tasks, "results": [o.to_wire() for o in outcomes], "refused": refused})

    async def results(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        agent_id = await self.auth.agent(request, data)
        outcomes = await self.board.accept(agent_id, _list(body, "results"))
        return reply(request, {"results": [o.to_wire() for o in outcomes]})

    async def task_result(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        agent_id = await self.auth.agent(request, data)
        [outcome] = await self.board.accept(agent_id, [body.get("result")])
        if outcome.error is not None:
            raise outcome.error
        if outcome.task_id != request.match_info["task_id"]:
            raise BadRequest("the result is for another task than the URL names")
        return reply(request, outcome.to_wire())

    async def heartbeat(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        agent_id = await self.auth.agent(request, data)
        return reply(request, await self.board.heartbeat(agent_id, _list(body, "leases")))

    async def release(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        agent_id = await self.auth.agent(request, data)
        await self.board.release(agent_id, request.match_info["task_id"], str(body.get("lease_id")))
        return reply(request, {"released": request.match_info["task_id"]})

    # -- submitters -----------------------------------------------------------------------------
    async def submit(self, request: web.Request) -> web.Response:
        data, body = await _body(request)
        envelope = SignedRecord.from_wire(body.get("envelope"))
        submitter = await self.auth.submitter(request, data, extra_key=envelope.key)
        job, created = await self.board.submit(body.get("envelope"), submitter)
        view = await self.board.job_view(job.id)
        return reply(request, {"job": view, "created": created}, 201 if created else 200)

    async def list_jobs(self, request: web.Request) -> web.Response:
        data = await request.read()
        await self.auth.submitter(request, data)
        state_text = request.query.get("state")
        try:
            state = JobState(state_text) if state_text else None
        except ValueError as exc:
            raise BadRequest(f"state: expected one of {', '.join(s.value for s in JobState)}") from exc
        limit = _int_query(request, "limit", 200)
        view = self.board.view
        return reply(request, {"jobs": [view.summary(job) for job in await view.list_jobs(state, limit)]})

    async def get_job(self, request: web.Request) -> web.Response:
        await self.auth.submitter(request, await request.read())
        job_id = request.match_info["job_id"]
        wait_s = min(float(_int_query(request, "wait", 0)), self.config.max_poll_wait_s)
        view = await self.board.job_view(job_id)
        if wait_s > 0 and view["state"] in ("queued", "running"):
            await self.board.wait_job(job_id, wait_s)
            view = await self.board.job_view(job_id)
        return reply(request, {"job": view})

    async def job_tasks(self, request: web.Request) -> web.Response:
        await self.auth.submitter(request, await request.read())
        job_id = request.match_info["job_id"]
        await self.board.job_view(job_id)
        tasks = await self.board.view.tasks(job_id)
        return reply(request, {"tasks": [
            {"id": t.id, "idx": t.idx, "state": t.state.value, "attempt": t.attempt, "agent": t.agent_id,
             "progress": t.progress, "error": t.error, "error_class": t.error_class,
             "checkpoint": t.checkpoint} for t in tasks]})

    async def job_results(self, request: web.Request) -> web.Response:
        await self.auth.submitter(request, await request.read())
        job_id = request.match_info["job_id"]
        view = await self.board.job_view(job_id)
        rows = await self.board.view.results(job_id)
        job = await self.board.view.find_job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return reply(request, {"job": view, "envelope": job.envelope, "results": [
            {"task_id": r.task_id, "attempt": r.attempt, "agent": r.agent_id, "digest": r.digest,
             "record": r.record} for r in rows]})

    async def cancel(self, request: web.Request) -> web.Response:
        submitter = await self.auth.submitter(request, await request.read())
        job = await self.board.cancel(request.match_info["job_id"], submitter)
        return reply(request, {"job": await self.board.job_view(job.id)})


def _int_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return max(0, int(float(text)))
    except ValueError as exc:
        raise BadRequest(f"query parameter {name}: expected a number, got {text!r}") from exc


def create_app(board: Board, config: HubConfig) -> web.Application:
    """The board's HTTP API; the blob routes too when the board has a blob store."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    auth = Authenticator(board, config.signature_skew_s)
    if board.blobs is not None:
        add_blob_routes(app, board.blobs, auth.member, reply=reply)
    app[BOARD_KEY] = board
    app[AUTH_KEY] = auth
    api = Api(board, auth, config)
    app.router.add_post("/v1/agents", api.register)
    app.router.add_post("/v1/lease", api.lease)
    app.router.add_post("/v1/results", api.results)
    app.router.add_post("/v1/heartbeat", api.heartbeat)
    app.router.add_post("/v1/tasks/{task_id}/result", api.task_result)
    app.router.add_post("/v1/tasks/{task_id}/release", api.release)
    app.router.add_post("/v1/jobs", api.submit)
    app.router.add_get("/v1/jobs", api.list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", api.get_job)
    app.router.add_get("/v1/jobs/{job_id}/tasks", api.job_tasks)
    app.router.add_get("/v1/jobs/{job_id}/results", api.job_results)
    app.router.add_delete("/v1/jobs/{job_id}", api.cancel)
    add_status_routes(app, board, config)   # GET /, /static, /v1/status, /v1/events, /v1/jobs/{id}/public
    add_metrics(app, board)                  # GET /metrics and the request-timing middleware
    add_openapi(app)                         # GET /v1/openapi.json
    return app
