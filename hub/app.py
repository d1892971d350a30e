"""The board's HTTP API (aiohttp): the routes and their handlers.

A handler reads the raw body (:func:`hub.http.read_raw`), authenticates the caller over those bytes
(hub/auth.py; a new agent's registration: admission first, hub/admission.py), and only then decodes the
body (:func:`hub.http.decode_map`, bounded) into its typed record (:mod:`jobs.protocol`, ``protocol_*``) once: a
malformed one is a 400 naming the field, and everything past that line is typed. Replies, errors and
bodies are :mod:`hub.http`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from hub.admission import Admission
from hub.auth import Authenticator
from hub.blob_access import BlobAccess
from hub.blob_routes import add_blob_routes
from hub.board import Board
from hub.config import HubConfig
from hub.connections import StreamCaps
from hub.envelope_routes import add_envelope_routes
from hub.http import BODY_TIMEOUT_KEY, decode_map, error_middleware, int_query, read_raw, reply
from hub.intake import hub_limits
from hub.metrics import add_metrics
from hub.openapi import add_openapi
from hub.records import JobState
from hub.status_routes import add_status_routes
from hub.upload_routes import add_upload_routes
from hub.uploads import UploadSessions
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_results import ResultsReply, ResultsRequest, TaskResult
from jobs.protocol_upkeep import Heartbeat, HeartbeatLease, Release, Released
from security.errors import BadRequest, NotFound, Unauthorized
from security.identity import PublicKey
from security.records import SignedRecord

__all__ = ["ADMISSION_KEY", "AUTH_KEY", "BOARD_KEY", "STREAMS_KEY", "create_app"]

BOARD_KEY = web.AppKey("board", Board)
AUTH_KEY = web.AppKey("auth", Authenticator)
ADMISSION_KEY = web.AppKey("admission", Admission)
STREAMS_KEY = web.AppKey("streams", StreamCaps)


#: the largest body of an unknown key that POST /v1/jobs decodes to name the key in its 403 (a bigger one
#: gets the 401 ``unknown_key``, undecoded)
UNKNOWN_KEY_BODY_BYTES = 64 * 1024


class Api:
    def __init__(self, board: Board, auth: Authenticator, admission: Admission, streams: StreamCaps,
                 config: HubConfig, access: BlobAccess) -> None:
        self.board, self.auth, self.admission, self.config = board, auth, admission, config
        self.streams, self.access = streams, access

    # -- agents ---------------------------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        checked = self.auth.precheck(request, data)   # signed, fresh, digest matches: nothing decoded yet
        known = self.board.agents.get(checked.params.keyid)
        if known is not None:   # a known agent re-registers (new capabilities): its key is its proof
            self.auth.finish(request, checked, known.key)
            registration = Registration.decode(decode_map(request, data))
            if registration.public_key.id != known.key.id:
                raise BadRequest("public_key: an agent cannot change its key", code="key_mismatch")
            owner = None
        else:                   # a new agent: admitted by token (or open, rate-limited) before decoding
            ticket = await self.admission.check(request)
            owner = ticket.owner or None
            registration = Registration.decode(decode_map(request, data))
            key = registration.public_key
            if key.id != checked.params.keyid:
                raise Unauthorized(f"the request is signed by {checked.params.keyid}, not by the key it "
                                   f"registers ({key.id})", code="bad_signature")
            self.auth.finish(request, checked, key)
            await self.admission.consume(ticket)
        agent = await self.board.register_agent(registration.public_key, registration.name,
                                                registration.capabilities, owner=owner)
        config = self.config
        return reply(request, Registered(agent.row.id, config.lease_ttl_s, config.max_poll_wait_s,
                                         config.max_tasks_per_lease,
                                         self.board.trust.agent_view(agent.row.id)).encode())

    async def lease(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        agent_id = await self.auth.agent(request, data)
        body = decode_map(request, data)
        asked = LeaseRequest.decode(body)
        with self.streams.hold("long_poll"):
            outcomes = await self.board.accept(agent_id, asked.results)
            tasks = await self.board.lease(agent_id, asked.slots, asked.wait_s, asked.have)
        refused = self.board.view.agents[agent_id].refused
        standing = self.board.trust.agent_view(agent_id)
        pause = self.board.retry_after(agent_id) if not tasks and refused is None else None
        return reply(request, LeaseReply(tuple(tasks), tuple(outcomes), refused, standing, pause).encode())

    async def results(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        agent_id = await self.auth.agent(request, data)
        body = decode_map(request, data)
        delivered = ResultsRequest.decode(body)
        outcomes = await self.board.accept(agent_id, delivered.results)
        return reply(request, ResultsReply(tuple(outcomes)).encode())

    async def task_result(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        agent_id = await self.auth.agent(request, data)
        body = decode_map(request, data)
        delivered = TaskResult.decode(body)
        [outcome] = await self.board.accept(agent_id, [delivered.result])
        if outcome.error is not None:
            raise outcome.error
        if outcome.task_id != request.match_info["task_id"]:
            raise BadRequest("the result is for another task than the URL names")
        return reply(request, outcome.encode())

    async def heartbeat(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        agent_id = await self.auth.agent(request, data)
        body = decode_map(request, data)
        leases = await self._own_checkpoints(agent_id, Heartbeat.decode(body).leases)
        return reply(request, (await self.board.heartbeat(agent_id, leases)).encode())

    async def _own_checkpoints(self, agent_id: str, leases: tuple[HeartbeatLease, ...]) -> tuple[HeartbeatLease, ...]:
        """A heartbeat may name a *new* checkpoint only if the agent uploaded that blob (else it is ignored).
        One the task already records was checked when it was recorded: no store query per heartbeat."""
        out = []
        for lease in leases:
            task = self.board.view.task(lease.task_id)
            sha = lease.checkpoint
            new = bool(sha) and (task is None or task.checkpoint != sha)
            if sha and new and not await self.access.own_checkpoint(agent_id, sha):
                lease = dataclasses.replace(lease, checkpoint=None)
            out.append(lease)
        return tuple(out)

    async def release(self, request: web.Request) -> web.Response:
        data = await read_raw(request)
        agent_id = await self.auth.agent(request, data)
        body = decode_map(request, data)
        release = Release.decode(body)
        task_id = request.match_info["task_id"]
        await self.board.release(agent_id, task_id, release.lease_id)
        return reply(request, Released(task_id).encode())

    async def limits(self, request: web.Request) -> web.Response:
        return reply(request, hub_limits(self.config))

    # -- submitters -----------------------------------------------------------------------------
    async def submit(self, request: web.Request) -> web.Response:
        data = await read_raw(request)

        def manifest_key() -> PublicKey | None:   # asked for only when the signing key is unknown
            # A stranger's body is decoded only when small: any fresh key can sign a 4 MB body of empty
            # maps, and decoding it is what "authenticate before you parse" keeps from strangers.
            if len(data) > UNKNOWN_KEY_BODY_BYTES:
                return None
            return SignedRecord.from_wire(decode_map(request, data).get("envelope")).key

        submitter = await self.auth.submitter(request, data, body_key=manifest_key)
        int_query(request, "wait", 0)   # a bad ?wait is a 400 before the job is committed (a 400 is final)
        body = decode_map(request, data)
        if self.board.blobs is not None:
            await self.access.check_inputs(body.get("envelope"), submitter)
        job, created = await self.board.submit(body.get("envelope"), submitter)
        # ``?wait=S``: one request from submit to the finished job (the shorter path for one task): the job is
        # committed above, so the wait is a long-poll like GET's; a retry of the same envelope waits again.
        view = await self._view_after(request, job.id, self.streams.room("long_poll"))
        return reply(request, {"job": view, "created": created}, 201 if created else 200)

    async def _view_after(self, request: web.Request, job_id: str, may_wait: bool = True) -> dict[str, Any]:
        """The job's view, after waiting up to the query's ``wait`` seconds (capped) for it to finish.
        The final view comes from memory as the job's last commit made it (Board.wait_job)."""
        wait_s = min(float(int_query(request, "wait", 0)), self.config.max_poll_wait_s) if may_wait else 0.0
        if wait_s > 0 and self.board.is_active(job_id):
            with self.streams.hold("long_poll"):
                final = await self.board.wait_job(job_id, wait_s)
            if final is not None:
                return final
        return await self.board.job_view(job_id)

    async def list_jobs(self, request: web.Request) -> web.Response:
        caller = await self.auth.submitter(request, await read_raw(request))
        state_text = request.query.get("state")
        try:
            state = JobState(state_text) if state_text else None
        except ValueError as exc:
            raise BadRequest(f"state: expected one of {', '.join(s.value for s in JobState)}") from exc
        limit = int_query(request, "limit", 200)
        view = self.board.view
        if self.is_admin(caller):
            jobs = await view.list_jobs(state, limit)
        else:
            jobs = await self.board.store.list_submitter_jobs(caller, state, limit)
        return reply(request, {"jobs": [view.summary(job) for job in jobs]})

    def is_admin(self, key_id: str) -> bool:
        """An admin key (hub.yaml ``admins``) reads every submitter's jobs, results and blobs."""
        return key_id in self.config.admins

    async def own_job(self, request: web.Request) -> tuple[str, str]:
        """Authenticate a submitter and return it and the URL's job id if the job is theirs (or they are an
        admin). Another submitter's job is the same 404 as no job at all: its existence is not revealed."""
        caller = await self.auth.submitter(request, await read_raw(request))
        job_id = request.match_info["job_id"]
        job = await self.board.view.find_job(job_id)
        if job is None or (job.submitter_id != caller and not self.is_admin(caller)):
            raise NotFound(f"no job {job_id}", code="no_such_job")
        return caller, job_id

    async def get_job(self, request: web.Request) -> web.Response:
        _, job_id = await self.own_job(request)
        return reply(request, {"job": await self._view_after(request, job_id)})

    async def job_tasks(self, request: web.Request) -> web.Response:
        _, job_id = await self.own_job(request)
        await self.board.job_view(job_id)
        tasks = await self.board.view.tasks(job_id)
        return reply(request, {"tasks": [
            {"id": t.id, "idx": t.idx, "unit": t.unit_idx, "state": t.shown_state, "attempt": t.attempt,
             "agent": t.agent_id, "progress": t.progress, "error": t.error, "error_class": t.error_class,
             "checkpoint": t.checkpoint} for t in tasks]})

    async def job_results(self, request: web.Request) -> web.Response:
        _, job_id = await self.own_job(request)
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
        caller, job_id = await self.own_job(request)
        job = await self.board.cancel(job_id, caller)   # an admin sees others' jobs but cancels only its own
        return reply(request, {"job": await self.board.job_view(job.id)})


def create_app(board: Board, config: HubConfig) -> web.Application:
    """The board's HTTP API; the blob routes too when the board has a blob store."""
    streams = StreamCaps(config.max_long_polls, config.max_streams)
    app = web.Application(middlewares=[error_middleware, streams.middleware()], client_max_size=config.max_body_bytes)
    auth = Authenticator(board, config.signature_skew_s)
    access = BlobAccess(board, config)
    admission = Admission(board.store, config)
    app[BODY_TIMEOUT_KEY] = config.body_timeout_s
    if board.blobs is not None:
        add_blob_routes(app, board.blobs, auth.member, access)
        add_upload_routes(app, UploadSessions.for_board(board.blobs, config, access), auth.member, access,
                          auth.uploader)
    app[BOARD_KEY] = board
    app[AUTH_KEY] = auth
    app[ADMISSION_KEY] = admission
    app[STREAMS_KEY] = streams
    api = Api(board, auth, admission, streams, config, access)
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
    add_envelope_routes(app, board, auth, config)   # GET /v1/jobs/{id}/envelope: a big manifest, to its lessees
    add_status_routes(app, board, config)   # GET /, /static, /v1/status, /v1/events, /v1/jobs/{id}/public
    add_metrics(app, board)                  # GET /metrics and the request-timing middleware
    add_openapi(app)                         # GET /v1/openapi.json
    return app
