"""The board's HTTP API over real TLS: every kind of bad input gets a specific 4xx, nothing is lost."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from conftest import InProcessHub
from helpers import wait_for_async
from hub_clients import submitter

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.metrics import METRICS_KEY
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from security.errors import BadRequest, Conflict, Forbidden, PanalError, PayloadTooLarge, Unauthorized
from security.httpsig import sign_request
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress


def sleep_manifest(n: int = 1, seconds: float = 0.0) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "api"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [seconds] * n}}})


async def raw(hub: InProcessHub, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
            session.request(method, path, data=body, headers=headers) as resp:
        data = await resp.read()
        return resp.status, (json.loads(data) if resp.content_type == "application/json"
                             else msgpack.unpackb(data))


async def registered(hub: InProcessHub, **caps: Any) -> tuple[BoardClient, Identity]:
    """A new agent registered over TLS (a sleep runner that checks committed jobs' unit proofs, as this repository's
    agent does; ``caps`` add to its capability report, ``features=[]`` for an agent from before them)."""
    assert hub.address is not None
    agent = Identity.generate()
    client = BoardClient(hub.address, agent, retry_for_s=1)
    await client.call("POST", "/v1/agents", {"public_key": agent.public.text(), "name": "a",
                                             "capabilities": {"kinds": ["sleep"], "features": [UNIT_PROOFS],
                                                              **caps}})
    return client, agent


def result(agent: Identity, task: dict[str, Any], **values: Any) -> dict[str, Any]:
    return SignedRecord.sign(agent, {"task_id": task["task_id"], "job_id": task["job_id"],
                                     "lease_id": task["lease_id"], "attempt": task["attempt"],
                                     "agent_id": agent.id, "status": "ok", "values": values}).to_wire()


async def test_status_is_public_and_json_on_request(hub: InProcessHub) -> None:
    status, body = await raw(hub, "GET", "/v1/status", b"", {"Accept": "application/json"})
    assert status == 200 and body["agents"]["registered"] == 0


async def test_signature_failures_are_specific_401s(hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    body = msgpack.packb({"slots": 1})
    cases: dict[str, dict[str, str]] = {
        "unsigned": {},
        "bad_signature": {**sign_request(agent, "POST", "/v1/lease", "", body),
                          "signature": "panal=:" + "A" * 86 + "==:"},
        "unknown_key": sign_request(Identity.generate(), "POST", "/v1/lease", "", body),
        "stale_signature": sign_request(agent, "POST", "/v1/lease", "", body, now=1_000_000),
        "bad_digest": sign_request(agent, "POST", "/v1/lease", "", b"other"),
    }
    for code, headers in cases.items():
        status, reply = await raw(hub, "POST", "/v1/lease", body, {**headers, "Content-Type": "application/msgpack"})
        assert (status, reply["error"]) == (401, code), reply
        assert reply["message"]
    # Replay: the first use passes, the identical second one is refused.
    headers = {**sign_request(agent, "POST", "/v1/lease", "", body), "Content-Type": "application/msgpack"}
    assert (await raw(hub, "POST", "/v1/lease", body, headers))[0] == 200
    status, reply = await raw(hub, "POST", "/v1/lease", body, headers)
    assert (status, reply["error"]) == (401, "replay")
    await client.close()


async def test_malformed_and_oversized_bodies(tmp_path: Any) -> None:
    hub = InProcessHub(tmp_path, max_body_bytes=4096)
    await hub.start()
    try:
        client, agent = await registered(hub)
        for content_type, body in (("application/msgpack", b"\xc1\xff\x00"), ("application/json", b"{nope")):
            headers = {**sign_request(agent, "POST", "/v1/lease", "", body), "Content-Type": content_type}
            status, reply = await raw(hub, "POST", "/v1/lease", body, headers)
            assert (status, reply["error"]) == (400, "malformed_body"), reply
        big = msgpack.packb({"results": ["x" * 10_000]})
        headers = {**sign_request(agent, "POST", "/v1/lease", "", big), "Content-Type": "application/msgpack"}
        status, reply = await raw(hub, "POST", "/v1/lease", big, headers)
        assert (status, reply["error"]) == (413, "body_too_large")
        with pytest.raises(PayloadTooLarge):
            await client.call("POST", "/v1/results", {"results": ["y" * 10_000]})
        with pytest.raises(BadRequest, match="slots"):
            await client.call("POST", "/v1/lease", {"slots": "many"})
        await client.close()
    finally:
        await hub.stop()


async def test_submitters_must_be_authorised(hub: InProcessHub) -> None:
    assert hub.address is not None
    stranger = Identity.generate()
    async with BoardClient(hub.address, stranger, retry_for_s=1) as client:
        with pytest.raises(Forbidden, match=stranger.id) as exc:
            await submit(client, make_envelope(stranger, sleep_manifest()))
        assert exc.value.code == "not_a_submitter"
    sub = await submitter(hub)
    bad = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"task": "sleep", "params": {"seconds": -1}}}
    forged = SignedRecord.sign(sub.identity, {"manifest": bad, "created": 0, "nonce": "n"}).to_wire()
    with pytest.raises(BadRequest, match=r"spec.params.seconds"):
        await submit(sub, forged)
    await sub.close()


async def test_lease_results_and_conflicts_over_http(hub: InProcessHub) -> None:
    sub = await submitter(hub)
    a0, agent0 = await registered(hub)
    a1, agent1 = await registered(hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_manifest(1)))
    [task] = (await a0.call("POST", "/v1/lease", {"slots": 1, "wait_s": 1}))["tasks"]
    # Someone else's lease.
    with pytest.raises(Forbidden) as exc:
        await a1.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": result(agent1, task)})
    assert exc.value.code == "not_your_lease"
    # The real one, then a duplicate (same digest) and a different result for the same task.
    record = result(agent0, task)
    ok = await a0.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    assert ok["status"] == "accepted"
    dup = await a0.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": record})
    assert dup["status"] == "duplicate"
    with pytest.raises(Conflict):
        await a0.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": result(agent0, task, other=1)})
    reply = await sub.call("GET", f"/v1/jobs/{job['id']}/results")
    assert len(reply["results"]) == 1 and reply["results"][0]["digest"]
    for c in (sub, a0, a1):
        await c.close()


async def test_long_poll_returns_work_as_soon_as_it_arrives(tmp_path: Path) -> None:
    # Polls may wait an hour here: a reply within the test can only come from the submission waking it.
    hub = InProcessHub(tmp_path, max_poll_wait_s=3600)
    dispatches = (await hub.start()).app[METRICS_KEY].registry
    sub = await submitter(hub)
    a0, _ = await registered(hub)
    poll = asyncio.create_task(a0.call("POST", "/v1/lease", {"slots": 4, "wait_s": 3600}, timeout_s=3600))
    try:
        # The poll asked the dispatch policy once, found nothing, and parked.
        await wait_for_async(lambda: dispatches.get_sample_value("panal_dispatch_seconds_count") == 1,
                             "the lease request to find the board empty")
        assert not poll.done()
        await submit(sub, make_envelope(sub.identity, sleep_manifest(3)))
        await wait_for_async(poll.done, "the submission to wake the parked poll")
        assert len(poll.result()["tasks"]) == 3
    finally:
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
        for client in (sub, a0):
            await client.close()
        await hub.stop()


async def test_transport_refusals(hub: InProcessHub) -> None:
    assert hub.address is not None
    ident = Identity.generate()
    wrong = BoardAddress(hub.address.url, "00" * 32)
    async with BoardClient(wrong, ident, retry_for_s=1) as client:
        with pytest.raises(Unauthorized) as exc:
            await client.call("GET", "/v1/status")
        assert exc.value.code == "fingerprint_mismatch"
    plain = BoardAddress(hub.address.url.replace("https://", "http://"))
    async with BoardClient(plain, ident, retry_for_s=0.5) as client:
        with pytest.raises(PanalError) as failure:
            await client.call("GET", "/v1/status")
        assert failure.value.code == "wrong_protocol" and "speaks HTTPS only" in failure.value.message
    with pytest.raises(ssl.SSLError):  # an unpinned, verifying client refuses the self-signed cert
        async with aiohttp.ClientSession() as session:
            await session.get(hub.address.url + "/v1/status")


async def test_blob_gc_keeps_what_jobs_reference_and_collects_the_rest(tmp_path: Any) -> None:
    from agent.client.submitting import upload_inputs

    hub = InProcessHub(tmp_path, blob_gc_grace_s=0)
    server = await hub.start()
    try:
        sub = await submitter(hub)
        files = {}
        for name in ("model", "data", "orphan"):
            path = tmp_path / f"{name}.bin"
            path.write_bytes(name.encode() * 1000)
            files[name] = path
        from agent.client.blobcache import hash_file

        shas = {name: hash_file(path)[0] for name, path in files.items()}
        await upload_inputs(sub, [(shas[n], files[n]) for n in files])
        manifest = Manifest.from_dict({
            "apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "gc"},
            "spec": {"task": "inference", "inputs": {
                "model": {"blob": shas["model"], "size": 5000, "name": "model.pt2"},
                "data": {"blob": shas["data"], "size": 4000, "name": "data.safetensors"}}}})
        await submit(sub, make_envelope(sub.identity, manifest))
        deleted = await server.collect_garbage()
        assert deleted == [shas["orphan"]]
        assert server.blobs.exists(shas["model"]) and server.blobs.exists(shas["data"])
        # A job may not reference a blob the board does not have (inputs are uploaded first).
        missing = dict(manifest.source)
        missing["spec"] = {**manifest.source["spec"], "inputs": {
            "model": {"blob": shas["orphan"], "size": 6000, "name": "m"},
            "data": {"blob": shas["data"], "size": 4000, "name": "d"}}}
        with pytest.raises(BadRequest) as exc:
            await submit(sub, make_envelope(sub.identity, Manifest.from_dict(missing)))
        assert exc.value.code == "missing_blob"
        await sub.close()
    finally:
        await hub.stop()


async def test_gets_answer_json_unless_msgpack_is_asked_for(hub: InProcessHub) -> None:
    assert hub.address is not None and hub.address.fingerprint
    sub = await submitter(hub)
    job = await submit(sub, make_envelope(sub.identity, sleep_manifest(2)))
    signed = [("/v1/jobs", ""), (f"/v1/jobs/{job['id']}", ""), (f"/v1/jobs/{job['id']}/tasks", ""),
              (f"/v1/jobs/{job['id']}/results", ""), ("/v1/jobs", "state=queued")]
    public = ["/v1/status", f"/v1/jobs/{job['id']}/public", "/v1/openapi.json",
              "/v1/jobs/jnope/public", "/v1/no-such-route", f"/v1/jobs/{job['id']}"]   # the last: unsigned, 401
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session:
        requests = [(path, query, sign_request(sub.identity, "GET", path, query, b"")) for path, query in signed]
        requests += [(path, "", {}) for path in public]
        for path, query, headers in requests:
            async with session.get(path + (f"?{query}" if query else ""), headers=headers) as resp:
                assert resp.content_type == "application/json", (path, resp.status, resp.content_type)
                body = json.loads(await resp.read())
                assert isinstance(body, dict) and (resp.status == 200) == ("error" not in body), (path, body)
        async with session.get("/v1/status", headers={"Accept": "application/msgpack"}) as resp:
            assert resp.content_type == "application/msgpack"
            assert msgpack.unpackb(await resp.read())["jobs"]["active"] == 1
    await sub.close()


async def test_a_strangers_big_signed_body_is_refused_undecoded(hub: InProcessHub, monkeypatch: Any) -> None:
    """Review finding: any fresh key could make POST /v1/jobs decode a 4 MB body (hub RSS 63 -> 360 MB)."""
    import hub.app as app_module
    decoded: list[int] = []
    real = app_module.decode_map
    monkeypatch.setattr(app_module, "decode_map",
                        lambda request, data: decoded.append(len(data)) or real(request, data))
    per = 99_000
    body = b"\x81\xa8envelope" + b"\xdd" + per.to_bytes(4, "big") + b"\x80" * per
    stranger = Identity.generate()
    headers = {**sign_request(stranger, "POST", "/v1/jobs", "", body), "Content-Type": "application/msgpack"}
    status, reply = await raw(hub, "POST", "/v1/jobs", body, headers)
    assert (status, reply["error"]) == (401, "unknown_key") and decoded == []


async def test_a_heartbeat_listing_one_lease_many_times_extends_it_once(hub: InProcessHub) -> None:
    """Review finding: 20 heartbeats each listing one lease 60,000 times left 1.2 M expiry entries (+170 MB)."""
    assert hub.server is not None
    client, _ = await registered(hub)
    sub = await submitter(hub)
    await submit(sub, make_envelope(sub.identity, sleep_manifest(1, 60)))
    [task] = (await client.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0}))["tasks"]
    expiry = hub.server.board._leases._expiry
    before = len(expiry)
    await client.call("POST", "/v1/heartbeat", {"leases": [{"task_id": task["task_id"],
                                                            "lease_id": task["lease_id"]}] * 5000})
    assert len(expiry) - before <= 1
    await client.close()
    await sub.close()
