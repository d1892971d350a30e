"""The agent protocol's typed records: they round-trip through msgpack and JSON, encode to the very maps the
previous version sent (so old agents and boards interoperate), match the OpenAPI schemas, and a malformed
body sent to a real board over TLS is one 400 naming the field, never a 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema
import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import InProcessHub
from test_api import raw, registered

from agent.client.board import BoardClient
from hub.openapi import SPEC
from jobs.fields import Fields
from jobs.protocol import Assignment, LeaseReply, LeaseRequest, envelope_digest
from jobs.protocol_registration import Registered, Registration
from jobs.protocol_results import Outcome, ResultOutcome, ResultsReply, ResultsRequest, TaskResult, UnreadableResult
from jobs.protocol_upkeep import Heartbeat, HeartbeatLease, HeartbeatReply, LossReason, LostLease, Release, Released
from jobs.requirements import Capabilities
from jobs.wire import JSON, MSGPACK, decode_body, encode_body
from security.errors import BadRequest, Conflict, PanalError, Unavailable
from security.httpsig import sign_request
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress

AGENT = Identity.generate()
SUBMITTER = Identity.generate()
ENVELOPE = SignedRecord.sign(SUBMITTER, {"manifest": {"kind": "Job"}, "created": 0, "nonce": "n"})
RESULT = SignedRecord.sign(AGENT, {"task_id": "j1.0", "lease_id": "l1", "status": "ok", "values": {"x": 1.5}})
CAPS = {"kinds": ["sleep"], "memory_gb": 16, "cpu": {"cores": 8, "gflops_fp32": 120.5},
        "gpus": [{"name": "A100", "backend": "cuda", "vram_gb": 40}]}
ASSIGNMENT = Assignment("j1.0", "j1", 0, "l1", 2, "sleep", {"seconds": 0.5}, 60, 30.0, ENVELOPE, "ab" * 32)
#: the same job's next task, its envelope left out (the agent holds it: LeaseRequest.have)
BARE = Assignment("j1.1", "j1", 1, "l2", 1, "sleep", {"seconds": 0.5}, 60, 30.0, None)
HAVE = {"j1": envelope_digest(ENVELOPE), "j" + "0" * 20: "0123456789abcdef"}

#: (record, its OpenAPI schema): one of every record of jobs.protocol and jobs.protocol_*
RECORDS: list[tuple[Any, str]] = [
    (Registration(AGENT.public, "laptop", Capabilities.from_dict(CAPS)), "Registration"),
    (Registered(AGENT.id, 30.0, 20.0, 64), "Registered"),
    (LeaseRequest(4, 2.0, (RESULT,)), "LeaseRequest"),
    (LeaseRequest(4, 2.0, (), HAVE), "LeaseRequest"),
    (LeaseRequest(1, 0.0, (), {}), "LeaseRequest"),
    (LeaseReply((ASSIGNMENT, BARE)), "LeaseReply"),
    (LeaseReply((ASSIGNMENT, ASSIGNMENT), (ResultOutcome("j1.0", Outcome.ACCEPTED),
                                           ResultOutcome("j1.1", Outcome.PENDING)), "on a break"), "LeaseReply"),
    (LeaseReply(), "LeaseReply"),
    (ResultsRequest((RESULT, RESULT)), "Results"),
    (ResultsReply((ResultOutcome("j1.0", Outcome.DUPLICATE),
                   ResultOutcome("?", Outcome.REJECTED, Conflict("too late", code="lease_expired")))),
     "ResultOutcomes"),
    (TaskResult(RESULT), "TaskResult"),
    (ResultOutcome("j1.0", Outcome.REJECTED, BadRequest("no", code="bad_field", details={"field": "x"})),
     "ResultOutcome"),
    (Heartbeat((HeartbeatLease("j1.0", "l1", 0.25), HeartbeatLease("j1.1", "l2", 1, "cd" * 32))), "Heartbeat"),
    (HeartbeatReply(30, (LostLease("j1.0", LossReason.LOST), LostLease("j1.1", LossReason.CANCELLED))),
     "HeartbeatReply"),
    (Release("l1"), "Release"),
    (Released("j1.0"), "Released"),
]

IDS = [f"{type(record).__name__}-{i}" for i, (record, _) in enumerate(RECORDS)]


def validate(value: Any, schema_name: str) -> None:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(root).validate(value)


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
@pytest.mark.parametrize(("record", "schema"), RECORDS, ids=IDS)
def test_every_record_round_trips_to_the_same_bytes(record: Any, schema: str, content_type: str) -> None:
    body = encode_body(record.encode(), content_type)
    again = type(record).decode(decode_body(body, content_type))
    assert encode_body(again.encode(), content_type) == body
    if not isinstance(record, ResultOutcome | ResultsReply | LeaseReply):   # their errors are rebuilt, not equal
        assert again == record


@pytest.mark.parametrize(("record", "schema"), RECORDS, ids=IDS)
def test_every_record_matches_its_openapi_schema(record: Any, schema: str) -> None:
    validate(json.loads(encode_body(record.encode(), JSON)), schema)


def test_the_openapi_outcome_and_loss_enums_are_the_records_enums() -> None:
    schemas = SPEC["components"]["schemas"]
    assert schemas["ResultOutcome"]["properties"]["status"]["enum"] == ["accepted", "duplicate", "pending",
                                                                        "rejected"]
    lost = schemas["HeartbeatReply"]["properties"]["lost"]["items"]["properties"]["reason"]["enum"]
    assert lost == [r.value for r in LossReason]


def test_records_encode_to_the_maps_the_previous_version_sent() -> None:
    """Literal maps as the v1 agent and board built them by hand: the same keys, in the same order."""
    caps = dict(CAPS)
    old: list[tuple[Any, dict[str, Any]]] = [
        (Registration(AGENT.public, "laptop", Capabilities.from_dict(caps)),
         {"public_key": AGENT.public.text(), "name": "laptop", "capabilities": caps}),
        (Registered(AGENT.id, 10, 20.0, 64),
         {"agent_id": AGENT.id, "lease_ttl_s": 10, "max_poll_wait_s": 20.0, "max_tasks_per_lease": 64}),
        (LeaseRequest(2, 20.0, (RESULT,)), {"slots": 2, "wait_s": 20.0, "results": [RESULT.to_wire()]}),
        (ASSIGNMENT, {"task_id": "j1.0", "job_id": "j1", "idx": 0, "lease_id": "l1", "attempt": 2, "kind": "sleep",
                      "params": {"seconds": 0.5}, "timeout_s": 60, "lease_ttl_s": 30.0,
                      "envelope": ENVELOPE.to_wire(), "checkpoint": "ab" * 32}),
        (LeaseReply((), (ResultOutcome("j1.0", Outcome.ACCEPTED),), None),
         {"tasks": [], "results": [{"task_id": "j1.0", "status": "accepted"}], "refused": None}),
        (ResultOutcome("j1.0", Outcome.REJECTED, Conflict("late", code="lease_expired")),
         {"task_id": "j1.0", "status": "rejected", "error": "lease_expired", "message": "late"}),
        (Heartbeat((HeartbeatLease("j1.0", "l1", 0.5), HeartbeatLease("j1.1", "l2", 0.0, "cd" * 32))),
         {"leases": [{"task_id": "j1.0", "lease_id": "l1", "progress": 0.5},
                     {"task_id": "j1.1", "lease_id": "l2", "progress": 0.0, "checkpoint": "cd" * 32}]}),
        (HeartbeatReply(30.0, (LostLease("j1.0", LossReason.LOST),)),
         {"lease_ttl_s": 30.0, "lost": [{"task_id": "j1.0", "reason": "lost"}]}),
        (ResultsRequest((RESULT,)), {"results": [RESULT.to_wire()]}),
        (TaskResult(RESULT), {"result": RESULT.to_wire()}),
        (Release("l1"), {"lease_id": "l1"}),
        (Released("j1.0"), {"released": "j1.0"}),
    ]
    for record, wire in old:
        assert msgpack.packb(record.encode(), use_bin_type=True) == msgpack.packb(wire, use_bin_type=True), record


def test_a_decoded_body_keeps_what_the_previous_version_left_out() -> None:
    """Defaults where v1 readers had them: an old board's bare reply still decodes."""
    assert LeaseRequest.decode({}) == LeaseRequest(1, 0.0, ())
    assert LeaseReply.decode({"tasks": []}) == LeaseReply()
    assert Registered.decode({"agent_id": "a"}).lease_ttl_s == 30.0
    assert HeartbeatReply.decode({"lost": None}) == HeartbeatReply()
    assert Registration.decode({"public_key": AGENT.public.text()}).capabilities.raw == {}
    assert LeaseRequest.decode({"slots": 2.9}).slots == 2    # a fraction of a slot is cut off, as before


@pytest.mark.parametrize(("decode", "body", "message"), [
    (Heartbeat.decode, {"leases": [{"task_id": "a", "lease_id": "b"}, {"task_id": "a", "lease_id": "b"},
                                   {"task_id": "a", "lease_id": 5}]}, "leases[2].lease_id: expected text, got 5"),
    (Heartbeat.decode, {"leases": [{"lease_id": "b"}]}, "leases[0].task_id: expected text, got nothing"),
    (Heartbeat.decode, {"leases": [{"task_id": "a", "lease_id": "b", "progress": "half"}]},
     "leases[0].progress: expected a number, got 'half'"),
    (Heartbeat.decode, {"leases": {"a": 1}}, "leases: expected a list, got a map"),
    (Heartbeat.decode, {"leases": ["x"]}, "leases[0]: expected a map, got 'x'"),
    (LeaseRequest.decode, {"slots": "many"}, "slots: expected a number, got 'many'"),
    (LeaseRequest.decode, {"wait_s": float("inf")}, "wait_s: expected a number, got inf"),
    (LeaseRequest.decode, {"slots": True}, "slots: expected a number, got True"),
    (LeaseRequest.decode, {"have": ["j1"]}, "have: expected a map of job id to envelope digest, got a list"),
    (LeaseRequest.decode, {"have": {f"j{i}": "0" * 16 for i in range(65)}}, "have: at most 64 jobs, got 65"),
    (LeaseRequest.decode, {"have": {"j1": "0" * 64}},
     "have.j1: expected an envelope digest of 16 lowercase hex digits, got '0000000000"),
    (LeaseRequest.decode, {"have": {"j1": "ABCDEF0123456789"}},
     "have.j1: expected an envelope digest of 16 lowercase hex digits, got 'ABCDEF0123456789'"),
    (LeaseRequest.decode, {"have": {"j1": 5}}, "have.j1: expected an envelope digest of 16 lowercase hex digits"),
    (LeaseRequest.decode, {"have": {"x" * 65: "0" * 16}}, "have: a job id is text of 1 to 64 characters"),
    (LeaseRequest.decode, {"have": {"": "0" * 16}}, "have: a job id is text of 1 to 64 characters, got ''"),
    (LeaseReply.decode, {"tasks": [{**ASSIGNMENT.encode(), "idx": 1.5}]}, "tasks[0].idx: expected an integer, got 1.5"),
    (LeaseReply.decode, {"tasks": [{**ASSIGNMENT.encode(), "envelope": 7}]}, "tasks[0].envelope: a signed record"),
    (LeaseReply.decode, {"results": [{"task_id": "t", "status": "maybe"}]},
     "results[0].status: expected one of accepted, duplicate, pending, rejected, got 'maybe'"),
    (HeartbeatReply.decode, {"lost": [{"task_id": "t", "reason": None}]}, "lost[0].reason: expected text, got null"),
    (Registration.decode, {"public_key": 5}, "public_key: expected text, got 5"),
    (Registration.decode, {"public_key": "ed25519:AAAA"}, "public_key: an Ed25519 public key is 32 bytes"),
    (Registration.decode, {"public_key": AGENT.public.text(), "name": "x" * 1_000_000},
     "name: an agent name is at most 128 characters"),
    (Release.decode, {}, "lease_id: expected text, got nothing"),
    (TaskResult.decode, {"result": [1]}, "result: a signed record must be a map"),
    (Fields, [], "body: expected a map, got a list"),
])
def test_a_malformed_body_names_the_field(decode: Callable[[Any], Any], body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as exc:
        decode(body)
    assert exc.value.message.startswith(message), exc.value.message
    assert exc.value.code == "bad_field" and exc.value.details == {"field": message.partition(":")[0]}


def test_an_oversized_capability_report_is_refused_before_it_is_stored() -> None:
    with pytest.raises(BadRequest) as exc:
        Registration.decode({"public_key": AGENT.public.text(), "capabilities": {"junk": "x" * 2_000_000}})
    assert exc.value.code == "bad_capabilities" and "at most 65536 bytes" in exc.value.message


def test_a_bad_capability_report_is_a_bad_capabilities_400() -> None:
    with pytest.raises(BadRequest) as exc:
        Registration.decode({"public_key": AGENT.public.text(), "capabilities": {"cpu": {"cores": "many"}}})
    assert exc.value.code == "bad_capabilities" and exc.value.message.startswith("capabilities: malformed")
    with pytest.raises(BadRequest) as exc:
        Registration.decode({"public_key": AGENT.public.text(), "capabilities": {"features": "unit-proofs"}})
    assert exc.value.code == "bad_capabilities" and "features: expected a list" in exc.value.message


def test_an_unreadable_result_is_refused_alone_not_with_its_batch() -> None:
    request = ResultsRequest.decode({"results": [RESULT.to_wire(), "garbage", {"payload": 1}]})
    good, *bad = request.results
    assert good == RESULT
    assert [type(item) for item in bad] == [UnreadableResult, UnreadableResult]
    assert [item.error.message.split(":")[0] for item in bad if isinstance(item, UnreadableResult)] == \
        ["results[1]", "results[2]"]
    assert request.encode()["results"][1:] == ["garbage", {"payload": 1}]   # relayed as it came


def test_a_rejected_outcome_carries_the_boards_code_and_message_to_the_agent() -> None:
    outcome = ResultOutcome.decode({"task_id": "t", "status": "rejected", "error": "lease_expired",
                                    "message": "too late", "details": {"lease": "l1"}})
    assert outcome.status == Outcome.REJECTED and isinstance(outcome.error, PanalError)
    assert (outcome.error.code, outcome.error.message, outcome.error.details) == ("lease_expired", "too late",
                                                                                  {"lease": "l1"})
    assert ResultOutcome.decode({"task_id": "t", "status": "accepted"}).error is None


# -- over a real board ---------------------------------------------------------------------------------
GOOD_LEASE = {"task_id": "j0.0", "lease_id": "l"}
#: (path, body, content type, the field the 400 names, its code)
MALFORMED: list[tuple[str, Any, str, str, str]] = [
    ("/v1/lease", {"slots": "many"}, MSGPACK, "slots", "bad_field"),
    ("/v1/lease", {"wait_s": [1]}, JSON, "wait_s", "bad_field"),
    ("/v1/lease", {"slots": float("inf")}, JSON, "slots", "bad_field"),      # was an OverflowError: a 500
    ("/v1/lease", {"results": 5}, MSGPACK, "results", "bad_field"),
    ("/v1/lease", {"have": "everything"}, JSON, "have", "bad_field"),
    ("/v1/lease", {"have": {f"j{i}": "0" * 16 for i in range(1000)}}, MSGPACK, "have", "bad_field"),
    ("/v1/lease", {"have": {"j1": "not a digest"}}, JSON, "have.j1", "bad_field"),
    ("/v1/lease", {"have": {"j1": None}}, MSGPACK, "have.j1", "bad_field"),
    ("/v1/results", {"results": {"a": 1}}, JSON, "results", "bad_field"),
    ("/v1/heartbeat", {"leases": [GOOD_LEASE, GOOD_LEASE, {"task_id": "j0.0", "lease_id": 5}]}, MSGPACK,
     "leases[2].lease_id", "bad_field"),
    ("/v1/heartbeat", {"leases": [{"task_id": "j0.0", "lease_id": "l", "progress": "half"}]}, JSON,
     "leases[0].progress", "bad_field"),
    ("/v1/heartbeat", {"leases": [{"task_id": "j0.0", "lease_id": "l", "checkpoint": 5}]}, MSGPACK,
     "leases[0].checkpoint", "bad_field"),
    ("/v1/tasks/j0.0/release", {}, JSON, "lease_id", "bad_field"),
    ("/v1/tasks/j0.0/result", {"result": 5}, MSGPACK, "result", "bad_field"),
    ("/v1/agents", {"public_key": 5}, JSON, "public_key", "bad_field"),
    ("/v1/agents", {"public_key": "self", "name": 7}, MSGPACK, "name", "bad_field"),
    ("/v1/agents", {"public_key": "self", "capabilities": {"cpu": {"cores": "many"}}}, JSON, "capabilities",
     "bad_capabilities"),
    ("/v1/agents", {"public_key": "self", "capabilities": []}, MSGPACK, "capabilities", "bad_field"),
]


async def test_malformed_bodies_get_a_400_naming_the_field_from_a_real_board(hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    try:
        for path, body, content_type, field, code in MALFORMED:
            if body.get("public_key") == "self":
                body = {**body, "public_key": agent.public.text()}
            data = encode_body(body, content_type)
            headers = {**sign_request(agent, "POST", path, "", data), "Content-Type": content_type}
            status, reply = await raw(hub, "POST", path, data, headers)
            assert (status, reply["error"]) == (400, code), (path, body, reply)
            assert reply["message"].startswith(f"{field}: ") and reply["details"] == {"field": field}, reply
    finally:
        await client.close()


async def test_a_bad_item_of_a_batch_is_rejected_alone_by_a_real_board(hub: InProcessHub) -> None:
    client, _ = await registered(hub)
    try:
        reply = await client.post("/v1/results", ResultsRequest((RESULT, UnreadableResult("garbage", BadRequest("")))),
                                  ResultsReply.decode)
    finally:
        await client.close()
    signed_by_another, garbage = reply.results
    assert signed_by_another.status == garbage.status == Outcome.REJECTED
    assert signed_by_another.error is not None and signed_by_another.error.code == "signer_mismatch"
    assert garbage.task_id == "?" and garbage.error is not None
    assert garbage.error.message.startswith("results[1]: a signed record must be a map")


# -- the agent's side: replies decoded once, in the client --------------------------------------------
@pytest.fixture
async def odd_board() -> AsyncIterator[TestServer]:
    """A board that leases a task without a lease id."""

    async def lease(request: web.Request) -> web.Response:
        task = {**ASSIGNMENT.encode(), "lease_id": None}
        return web.Response(body=encode_body({"tasks": [task]}), content_type=MSGPACK)

    app = web.Application()
    app.router.add_post("/v1/lease", lease)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_a_malformed_reply_is_the_boards_fault_and_names_the_field(odd_board: TestServer) -> None:
    address = BoardAddress(str(odd_board.make_url("")).rstrip("/"))
    async with BoardClient(address, AGENT, retry_for_s=1) as client:
        with pytest.raises(Unavailable) as exc:
            await client.post("/v1/lease", LeaseRequest(), LeaseReply.decode)
    assert exc.value.code == "malformed_reply"
    assert "tasks[0].lease_id: expected text, got null" in exc.value.message


def test_an_envelope_the_agent_holds_is_left_out_and_only_an_agent_that_knows_have_sends_it() -> None:
    assert "envelope" not in BARE.encode() and Assignment.decode(BARE.encode()).envelope is None
    assert list(BARE.encode()) == [k for k in ASSIGNMENT.encode() if k != "envelope"]
    assert "have" not in LeaseRequest(2, 1.0).encode()                  # an older agent's map, unchanged
    assert LeaseRequest.decode(LeaseRequest(2, 1.0, (), {}).encode()).have == {}   # holds none, reads bare ones
    assert LeaseRequest.decode({"have": HAVE}).have == HAVE


@pytest.mark.parametrize("slots", [float("inf"), float("nan"), -float("inf")])
def test_a_capability_report_with_slots_that_are_not_a_finite_number_is_a_bad_capabilities_400(
        slots: float) -> None:
    """JSON's ``Infinity``/``NaN`` (and ``1e400``) decode to floats that ``int()`` cannot take: the fleet's
    free-slot index reads the slots on registration, so such a report was a 500 to a stranger."""
    with pytest.raises(BadRequest) as exc:
        Registration.decode({"public_key": AGENT.public.text(), "capabilities": {"slots": slots}})
    assert exc.value.code == "bad_capabilities" and "slots" in exc.value.message
