"""The board's API as OpenAPI 3.1 at ``GET /v1/openapi.json``; a test checks it against the real routes.

Replies are JSON unless msgpack is asked for (Accept): every body is described under both media types
with one schema. Signed requests carry RFC 9421 ``Signature``/``Signature-Input``/``Content-Digest``
headers (the ``panalSignature`` security scheme).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jobs.protocol import ENVELOPE_DIGEST_CHARS, MAX_HAVE, MAX_HAVE_JOB_ID
from jobs.protocol_results import Outcome
from jobs.protocol_upkeep import LossReason
from jobs.wire import JSON, MSGPACK

__all__ = ["SPEC", "add_openapi"]

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str] | None = None, **props: Schema) -> Schema:
    return {"type": "object", "properties": props, **({"required": required} if required else {})}


def _arr(items: Schema) -> Schema:
    return {"type": "array", "items": items}


S, N, I, B = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}  # noqa: E741
ANY_MAP: Schema = {"type": "object", "additionalProperties": True}
NULLABLE_S: Schema = {"type": ["string", "null"]}
NULLABLE_N: Schema = {"type": ["number", "null"]}
COUNTS: Schema = {"type": "object", "additionalProperties": {"type": "integer"}}
#: a job's best task by its manifest's spec.report (hub/best.py); the public page omits params and agent
BEST: Schema = {**_obj(["unit", "metric", "mode", "value"], task_id=S, unit=I, instance=S, metric=S,
                       mode={"enum": ["max", "min"]}, value=N, agent=NULLABLE_S, params=ANY_MAP),
                "type": ["object", "null"]}
REPORT: Schema = {**_obj(["metric", "mode"], metric=S, mode={"enum": ["max", "min"]}), "type": ["object", "null"]}
DETAILS: Schema = {"description": 'more about the error, e.g. {"field": "leases[2].lease_id"} for a malformed field'}
#: LeaseRequest.have: the envelopes an agent holds for this board (jobs/protocol.py, hub/envelopes.py)
HAVE: Schema = {"type": "object", "maxProperties": MAX_HAVE,
                "propertyNames": {"minLength": 1, "maxLength": MAX_HAVE_JOB_ID},
                "additionalProperties": {"type": "string", "pattern": f"^[0-9a-f]{{{ENVELOPE_DIGEST_CHARS}}}$"},
                "description": "job id -> the first 16 hex digits of sha256(key text + sig + payload) of that job's "
                               "envelope, for envelopes the agent holds from this board: the board leaves them out "
                               "of the assignments, and sends each other job's envelope once per reply. Absent: "
                               "every assignment carries its envelope (agents that predate it). A malformed map, or "
                               f"one of more than {MAX_HAVE} jobs, is a 400 naming the field."}


def _content(schema: Schema) -> dict[str, Any]:
    return {MSGPACK: {"schema": schema}, JSON: {"schema": schema}}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": _content(_ref(name))}


def _responses(ok: str, schema: Schema, *errors: int, description: str = "OK") -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": description, "content": _content(schema)}}
    for status in errors:
        out[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return out


def _op(summary: str, responses: dict[str, Any], *, body: str | None = None, signed: bool = True,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = _body(body)
    op["security"] = [{"panalSignature": []}] if signed else []
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": S}


def _query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


JOB_ID = _path_param("job_id", "a job id (j + 20 hex digits)")
TASK_ID = _path_param("task_id", "a task id (job id + '.' + index)")
SHA = _path_param("sha256", "the blob's SHA-256, 64 hex digits")
UPLOAD_ID = _path_param("upload_id", "an upload session's id (POST /v1/uploads)")
SIGNED_ERRORS = (400, 401, 403)
TEXT = {"text/plain": {"schema": S}}

SCHEMAS: dict[str, Schema] = {
    "Error": _obj(["error", "message"], error=S, message=S, details=DETAILS),
    "SignedRecord": {"type": "object", "description": "payload (msgpack bytes), key (ed25519:...), sig",
                     "additionalProperties": True},
    "Limits": _obj(["max_task_timeout_s", "max_task_memory_gb"], max_task_timeout_s=N, max_task_memory_gb=N,
                   default_task_memory_gb=N, max_tasks_per_job=I, max_result_bytes=I, max_blob_bytes=I,
                   upload_chunk_bytes=I, max_body_bytes=I),
    "Registration": _obj(["public_key"], public_key=S, name=S, capabilities=ANY_MAP),
    "Registered": _obj(["agent_id"], agent_id=S, lease_ttl_s=N, max_poll_wait_s=N, max_tasks_per_lease=I,
                       standing=ANY_MAP),
    "LeaseRequest": _obj(slots=I, wait_s=N, results=_arr(_ref("SignedRecord")), have=HAVE),
    "Assignment": _obj(["task_id", "job_id", "lease_id"], task_id=S, job_id=S, idx=I, lease_id=S, attempt=I,
                       kind=S, params=ANY_MAP, timeout_s=N, lease_ttl_s=N,
                       envelope={**_ref("SignedRecord"),
                                 "description": "the submitter's signed manifest; absent when the request's `have` "
                                                "names it or an earlier assignment of the reply carried it"},
                       checkpoint=NULLABLE_S, checkpoint_record=_ref("SignedRecord"),
                       proof={**_obj(["path"], path={**_arr({"description": "32 bytes"}), "maxItems": 48},
                                     shards=ANY_MAP),
                              "description": "of a committed job (its envelope signs a head and the Merkle root "
                                             "of its units: jobs/committed.py): the unit's shards (input -> blob, "
                                             "size, rows, start) and the sibling hashes from its leaf to the root"}),
    "ResultOutcome": _obj(["task_id", "status"], task_id=S, status={"enum": [o.value for o in Outcome]},
                          error=S, message=S, details=DETAILS),
    "LeaseReply": _obj(["tasks"], tasks=_arr(_ref("Assignment")), results=_arr(_ref("ResultOutcome")),
                       refused=NULLABLE_S, retry_after_s=N),
    "Results": _obj(["results"], results=_arr(_ref("SignedRecord"))),
    "ResultOutcomes": _obj(["results"], results=_arr(_ref("ResultOutcome"))),
    "TaskResult": _obj(["result"], result=_ref("SignedRecord")),
    "Heartbeat": _obj(["leases"], leases=_arr(_obj(["task_id", "lease_id"], task_id=S, lease_id=S, progress=N,
                                                   checkpoint=S, checkpoint_record=_ref("SignedRecord")))),
    "HeartbeatReply": _obj(lease_ttl_s=N, lost=_arr(_obj(["task_id", "reason"], task_id=S,
                                                         reason={"enum": [r.value for r in LossReason]}))),
    "Release": _obj(["lease_id"], lease_id=S),
    "Released": _obj(released=S),
    "Submission": _obj(["envelope"], envelope={
        **_ref("SignedRecord"), "description": "a committed manifest's envelope also carries `units`: its sweep and "
                                               "shard lists ({sweep: {key: [...]}, shards: {input: [...]}}), "
                                               "unsigned but bound by the signed root (400 units_root_mismatch)"}),
    "JobView": _obj(["id", "state"], id=S, name=S, kind=S, state=S, submitter=S, priority=I, created_at=N,
                    finished_at=NULLABLE_N, n_tasks=I, tasks=COUNTS, error=NULLABLE_S, labels=ANY_MAP,
                    waiting_because=_arr(S), report=REPORT, best=BEST),
    "Submitted": _obj(["job", "created"], job=_ref("JobView"), created=B),
    "Job": _obj(["job"], job=_ref("JobView")),
    "JobList": _obj(["jobs"], jobs=_arr(_ref("JobView"))),
    "TaskList": _obj(["tasks"], tasks=_arr(_obj(id=S, idx=I, unit=I, state=S, attempt=I, agent=NULLABLE_S, progress=N,
                                                error=NULLABLE_S, error_class=NULLABLE_S))),
    "JobResults": _obj(["job", "results"], job=_ref("JobView"), envelope=_ref("SignedRecord"),
                       results=_arr(_obj(task_id=S, attempt=I, agent=S, digest=S, record=_ref("SignedRecord")))),
    "BlobStored": _obj(["sha256", "size"], sha256=S, size=I, created=B),
    "Upload": _obj(["upload_id", "next_chunk"], upload_id=S, sha256=S, size=I, chunk_bytes=I, chunks=I,
                   next_chunk=I, received=I),
    "PublicJob": _obj(["id", "state", "n_tasks", "tasks", "progress"], id=S, name=S, kind=S, state=S, submitter=S,
                      priority=I, created_at=N, finished_at=NULLABLE_N, n_tasks=I, tasks=COUNTS, progress=N,
                      eta_s=NULLABLE_N, waiting_because=_arr(S), quorum=I, report=REPORT, best=BEST),
    "PublicAgent": _obj(["id", "name", "state"], id=S, name=S,
                        state={"enum": ["idle", "busy", "offline", "quarantined"]},
                        gpus=_arr(_obj(name=S, backend=S, vram_gb=N, gflops_fp32=N)),
                        cpu=_obj(model=S, cores=I, gflops_fp32=N), memory_gb=N,
                        running=_arr(_obj(task=S, job=S, job_name=S, idx=I, progress=N)), done=I, failed=I,
                        error_rate=N, credit=N, invalid_results=N, speed_flag=NULLABLE_S, last_seen=N,
                        registered_at=N, quarantine=NULLABLE_S),
    "Event": {**_obj(["type", "at"], type=S, at=N), "additionalProperties": True},
    "Status": _obj(
        ["agents", "jobs", "tasks", "stats"],
        agents=_obj(["registered", "online", "busy"], registered=I, online=I, idle=I, busy=I, offline=I,
                    quarantined=I),
        jobs=_obj(["active"], active=I), tasks=COUNTS, stats=COUNTS, generated_at=N, snapshot_interval_s=N,
        policy=S, gpus=_arr(_obj(["model", "count"], model=S, count=I)), tflops_online=N,
        agent_table=_arr(_ref("PublicAgent")), job_table=_arr(_ref("PublicJob")),
        agent_page=_ref("TablePage"), job_page=_ref("TablePage"),
        throughput=_arr(_obj(["minute", "done", "failed"], minute=I, done=I, failed=I)), events=_arr(_ref("Event")),
        kinds=_arr(_obj(["kind", "queued", "running"], kind=S, jobs=I, queued=I, running=I,
                        run_s_median=NULLABLE_N, run_s_p90=NULLABLE_N,
                        recent_attempts=I, failure_rate=NULLABLE_N, done=I, failed=I,
                        waiting_because=_arr(S))),
        history=_obj(["bucket_s", "start"], bucket_s=I, start=I, done=_arr(I), failed=_arr(I), agents=_arr(I),
                     backlog=_arr(I))),
    "TablePage": _obj(["offset", "limit", "total"], offset=I, limit=I, total=I),
    "PublicJobDetail": _obj(["job", "tasks", "waiting_because"], job=_ref("PublicJob"), waiting_because=_arr(S),
                            tasks=_arr(_obj(["idx", "state"], idx=I, state=S, attempt=I, agent=NULLABLE_S,
                                            agent_name=NULLABLE_S, progress=N, error_class=NULLABLE_S,
                                            updated_at=N)),
                            truncated=B),
}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/agents": {"post": _op("Register an agent (self-signed with the key it registers). A new agent on a hub "
                               "with token registration sends the join URL's token in Panal-Admission-Token; "
                               "open registration is rate-limited per address (429)",
                               _responses("200", _ref("Registered"), *SIGNED_ERRORS, 429), body="Registration")},
    "/v1/lease": {"post": _op("Long-poll for task assignments; may carry results. A job's signed manifest "
                              "(envelope) comes once per agent: not for jobs the request's `have` names",
                              _responses("200", _ref("LeaseReply"), *SIGNED_ERRORS, 413, 503), body="LeaseRequest")},
    "/v1/results": {"post": _op("Deliver signed results (each gets its own outcome)",
                                _responses("200", _ref("ResultOutcomes"), *SIGNED_ERRORS, 413, 503), body="Results")},
    "/v1/heartbeat": {"post": _op("Extend leases and report progress",
                                  _responses("200", _ref("HeartbeatReply"), *SIGNED_ERRORS), body="Heartbeat")},
    "/v1/tasks/{task_id}/result": {"post": _op(
        "Deliver one task's signed result", _responses("200", _ref("ResultOutcome"), *SIGNED_ERRORS, 409),
        body="TaskResult", params=[TASK_ID])},
    "/v1/tasks/{task_id}/release": {"post": _op(
        "Give a lease back (the task is requeued, no attempt used)",
        _responses("200", _ref("Released"), *SIGNED_ERRORS), body="Release", params=[TASK_ID])},
    "/v1/jobs": {
        "post": _op("Submit a submitter-signed manifest (idempotent)",
                    {**_responses("201", _ref("Submitted"), *SIGNED_ERRORS, description="created"),
                     "200": {"description": "already submitted", "content": _content(_ref("Submitted"))}},
                    body="Submission", params=[_query("wait", N, "seconds to wait for the job to finish before "
                                                      "answering (submit to result in one request)")]),
        "get": {**_op("List jobs", _responses("200", _ref("JobList"), *SIGNED_ERRORS)),
                "parameters": [_query("state", {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                                      "only jobs in this state"), _query("limit", I, "at most this many")]},
    },
    "/v1/jobs/{job_id}": {
        "get": _op("One job (optionally long-polls until it finishes)",
                   _responses("200", _ref("Job"), *SIGNED_ERRORS, 404),
                   params=[JOB_ID, _query("wait", N, "seconds to wait for the job to finish")]),
        "delete": _op("Cancel a job (its submitter only)", _responses("200", _ref("Job"), *SIGNED_ERRORS, 404),
                      params=[JOB_ID]),
    },
    "/v1/jobs/{job_id}/tasks": {"get": _op("A job's tasks (submitter view)",
                                           _responses("200", _ref("TaskList"), *SIGNED_ERRORS, 404), params=[JOB_ID])},
    "/v1/jobs/{job_id}/results": {"get": _op("A job's signed manifest and accepted signed results",
                                             _responses("200", _ref("JobResults"), *SIGNED_ERRORS, 404),
                                             params=[JOB_ID])},
    "/v1/jobs/{job_id}/envelope": {"get": _op(
        "A job's signed manifest, for an agent holding a lease of one of its tasks (403 `not_leased` otherwise): "
        "the lease reply leaves out an envelope over the board's inline_envelope_bytes; fetched once per agent, "
        "one at a time per agent (429 `envelope_busy`)",
        _responses("200", _ref("SignedRecord"), *SIGNED_ERRORS, 404, 429), params=[JOB_ID])},
    "/v1/jobs/{job_id}/public": {"get": _op(
        "Public task table of a job and why it waits (no parameters, no error text)",
        _responses("200", _ref("PublicJobDetail"), 404), signed=False, params=[JOB_ID])},
    "/v1/blobs/{sha256}": {
        "put": {**_op("Upload a content-addressed file (streamed; the digest is checked)",
                      _responses("201", _ref("BlobStored"), *SIGNED_ERRORS, 413), params=[SHA]),
                "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
                    "type": "string", "format": "binary"}}}}},
        "get": _op("Download a blob (streamed)",
                   {"200": {"description": "the file", "content": {"application/octet-stream": {"schema": {
                       "type": "string", "format": "binary"}}}}, **_responses("404", _ref("Error"), *SIGNED_ERRORS,
                                                                               description="no such blob")},
                   params=[SHA]),
    },
    "/v1/uploads": {"post": _op(
        "Open a resumable upload of a blob, or get the caller's open one for it (what to send next)",
        _responses("201", _ref("Upload"), *SIGNED_ERRORS, 409, 413, 429), params=[
            {**_query("sha256", S, "the blob's SHA-256"), "required": True},
            {**_query("size", I, "the blob's size in bytes"), "required": True}])},
    "/v1/uploads/{upload_id}": {"get": _op("An open upload: the next chunk the board needs",
                                           _responses("200", _ref("Upload"), *SIGNED_ERRORS, 404),
                                           params=[UPLOAD_ID])},
    "/v1/uploads/{upload_id}/{index}": {"put": {**_op(
        "One chunk, signed over its own Content-Digest and checked on arrival; after the last one the blob is stored",
        _responses("200", _ref("Upload"), *SIGNED_ERRORS, 404, 409), params=[
            UPLOAD_ID, _path_param("index", "the chunk's number, from 0")]),
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
            "type": "string", "format": "binary"}}}}}},
    "/v1/limits": {"get": _op("What this hub allows a job (resources, tasks, result size): `panal validate --hub`",
                              _responses("200", _ref("Limits")), signed=False)},
    "/v1/status": {"get": _op(
        "Public summary of the board (what the status page renders), from a snapshot rebuilt once per interval; "
        "the agent and job tables are paged (agents: busy ones by name, then idle, quarantined, offline)",
        _responses("200", _ref("Status"), 400), signed=False, params=[
            _query("agents_offset", I, "first row of the agent table (default 0)"),
            _query("agents_limit", I, "rows of the agent table (default 50, at most 500)"),
            _query("jobs_offset", I, "first row of the job table: active jobs by priority, then recently finished"),
            _query("jobs_limit", I, "rows of the job table (default 50, at most 500)"),
            _query("agents_q", S, "agents whose name or id contains this text (case-insensitive, at most 64 chars)"),
            _query("agents_state", {"enum": ["busy", "idle", "offline", "quarantined"]}, "agents in this state"),
            _query("jobs_q", S, "jobs whose name or id contains this text (active and recently finished jobs)"),
            _query("jobs_state", {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                   "jobs in this state"),
            _query("jobs_kind", S, "jobs of this kind")])},
    "/v1/events": {"get": _op("Live board events and status snapshots (Server-Sent Events)", {"200": {
        "description": "an open stream: `event: board` (an Event) and `event: status` (a Status, default pages) "
                       "frames",
        "content": {"text/event-stream": {"schema": S}}},
        "503": {"description": "too many live viewers (hub.yaml max_status_viewers): retry after Retry-After "
                               "seconds, or poll /v1/status", "content": _content(_ref("Error"))}}, signed=False)},
    "/v1/openapi.json": {"get": _op("This description", {"200": {
        "description": "OpenAPI 3.1", "content": {JSON: {"schema": ANY_MAP}}}}, signed=False)},
    "/metrics": {"get": _op("Prometheus metrics (text exposition format)",
                            {"200": {"description": "metrics", "content": TEXT}}, signed=False)},
    "/": {"get": _op("The status page", {"200": {"description": "HTML", "content": {"text/html": {"schema": S}}}},
                     signed=False)},
    "/static/{name}": {"get": _op("A status page asset", {
        "200": {"description": "the asset", "content": {"text/javascript": {"schema": S}, "text/css": {"schema": S}}},
        "404": {"$ref": "#/components/responses/E404"}}, signed=False,
        params=[_path_param("name", "app.js or style.css")])},
}

_ERROR_TEXT = {400: "malformed request", 401: "missing, bad, stale or replayed signature",
               403: "not allowed (unknown agent, not a submitter, not the owner)", 404: "not found",
               409: "conflict (lease expired, task already settled)", 413: "body too large",
               429: "too many requests from this address; retry after Retry-After seconds",
               503: "the board cannot take it now; retry later"}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "panal board API", "version": "1",
             "description": "Replies are JSON unless you Accept application/msgpack; request bodies may be "
                            "either (Content-Type)."},
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": {f"E{code}": {"description": text, "content": _content(_ref("Error"))}
                      for code, text in _ERROR_TEXT.items()},
        "securitySchemes": {"panalSignature": {
            "type": "apiKey", "in": "header", "name": "Signature",
            "description": "RFC 9421 HTTP Message Signature (Ed25519) over method, path, content-digest, created "
                           "and nonce, with Signature-Input and Content-Digest headers"}},
    },
}


def add_openapi(app: web.Application) -> None:
    """Register ``GET /v1/openapi.json``."""

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(SPEC)

    app.router.add_get("/v1/openapi.json", openapi)
