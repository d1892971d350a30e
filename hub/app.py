"""The board's HTTP API (aiohttp): the routes and their handlers.

A handler reads the body (:func:`hub.http.read_body`), authenticates the caller, and decodes the body
into its typed record (:mod:`jobs.protocol`) once: a malformed one is a 400 naming the field, and
everything past that line is typed. Replies, errors and bodies are :mod:`hub.http`'s.
"""

from __future__ import annotations

from aiohttp import web

from hub.auth import Authenticator
from hub.blob_routes import add_blob_routes
from hub.board import Board
from hub.config import HubConfig
from hub.http import error_middleware, int_query, read_body, reply
from hub.intake import hub_limits
from hub.metrics import add_metrics
from hub.openapi import add_openapi
from hub.records import JobState
from hub.status_page import add_status_routes
from jobs.protocol import (
    Heartbeat,
    LeaseReply,
    LeaseRequest,
    Registered,
    Registration,
    Release,
    Released,
    ResultsReply,
    ResultsRequest,
    TaskResult,
)
from security.errors import BadRequest, Forbidden, NotFound
from security.records import SignedRecord

__all__ = ["AUTH_KEY", "BOARD_KEY", "create_app"]

BOARD_KEY = web.AppKey("board", Board)
AUTH_KEY = web.AppKey("auth", Authenticator)


class Api:
    def __init__(self, board: Board, auth: Authenticator, config: HubConfig) -> None:
        self.board, self.auth, self.config = board, auth, config

    # -- agents ---------------------------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        registration = Registration.decode(body)   # before the signature: it is made with this key
        key = registration.public_key
        await self.auth.verify(request, extra_key=key, body=data)
        if not self.config.open_registration and key.id not in self.board.view.agents:
            raise Forbidden(
                f"registration is closed on this board; ask its admin to admit agent {key.id}",
                code="registration_closed")
        agent = await self.board.register_agent(key, registration.name, registration.capabilities)
        config = self.config
        return reply(request, Registered(agent.row.id, config.lease_ttl_s, config.max_poll_wait_s,
                                         config.max_tasks_per_lease).encode())

    async def lease(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        agent_id = await self.auth.agent(request, data)
        asked = LeaseRequest.decode(body)
        outcomes = await self.board.accept(agent_id, asked.results)
        tasks = await self.board.lease(agent_id, asked.slots, asked.wait_s)
        refused = self.board.view.agents[agent_id].refused
        standing = self.board.trust.agent_view(agent_id)
        return reply(request, LeaseReply(tuple(tasks), tuple(outcomes), refused, standing).encode())

    async def results(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        agent_id = await self.auth.agent(request, data)
        delivered = ResultsRequest.decode(body)
        outcomes = await self.board.accept(agent_id, delivered.results)
        return reply(request, ResultsReply(tuple(outcomes)).encode())

    async def task_result(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        agent_id = await self.auth.agent(request, data)
        delivered = TaskResult.decode(body)
        [outcome] = await self.board.accept(agent_id, [delivered.result])
        if outcome.error is not None:
            raise outcome.error
        if outcome.task_id != request.match_info["task_id"]:
            raise BadRequest("the result is for another task than the URL names")
        return reply(request, outcome.encode())

    async def heartbeat(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        agent_id = await self.auth.agent(request, data)
        beat = Heartbeat.decode(body)
        return reply(request, (await self.board.heartbeat(agent_id, beat.leases)).encode())

    async def release(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
        agent_id = await self.auth.agent(request, data)
        release = Release.decode(body)
        task_id = request.match_info["task_id"]
        await self.board.release(agent_id, task_id, release.lease_id)
        return reply(request, Released(task_id).encode())

    async def limits(self, request: web.Request) -> web.Response:
        return reply(request, hub_limits(self.config))

    # -- submitters -----------------------------------------------------------------------------
    async def submit(self, request: web.Request) -> web.Response:
        data, body = await read_body(request)
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
        limit = int_query(request, "limit", 200)
        view = self.board.view
        return reply(request, {"jobs": [view.summary(job) for job in await view.list_jobs(state, limit)]})

    async def get_job(self, request: web.Request) -> web.Response:
        await self.auth.submitter(request, await request.read())
        job_id = request.match_info["job_id"]
        wait_s = min(float(int_query(request, "wait", 0)), self.config.max_poll_wait_s)
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
        tasks = {t.id: t for t in await self.board.tasks_of(job_id)}
        return reply(request, {"job": view, "envelope": job.envelope, "results": [
            {"task_id": r.task_id, "attempt": r.attempt, "agent": r.agent_id, "digest": r.digest,
             "record": r.record, "unit": tasks[r.task_id].unit_idx if r.task_id in tasks else None,
             "state": tasks[r.task_id].state.value if r.task_id in tasks else None} for r in rows],
            "validation": {"policy": job.validation, "units": await self.board.trust_records(job_id)}})

    async def cancel(self, request: web.Request) -> web.Response:
        submitter = await self.auth.submitter(request, await request.read())
        job = await self.board.cancel(request.match_info["job_id"], submitter)
        return reply(request, {"job": await self.board.job_view(job.id)})


def create_app(board: Board, config: HubConfig) -> web.Application:
    """The board's HTTP API; the blob routes too when the board has a blob store."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    auth = Authenticator(board, config.signature_skew_s)
    if board.blobs is not None:
        add_blob_routes(app, board.blobs, auth.member)
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
    app.router.add_get("/v1/limits", api.limits)   # public: what a job may ask of this hub
    add_status_routes(app, board, config)   # GET /, /static, /v1/status, /v1/events, /v1/jobs/{id}/public
    add_metrics(app, board)                  # GET /metrics and the request-timing middleware
    add_openapi(app)                         # GET /v1/openapi.json
    return app
