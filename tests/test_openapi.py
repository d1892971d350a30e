"""``/v1/openapi.json`` matches the real app's routes both ways, its schemas hold, and a bounded fuzz of
every described operation (unsigned, malformed, odd path values) gets no 5xx from a real board."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import aiohttp
import jsonschema
from conftest import InProcessHub
from test_status_page import GPU_CAPS, agent, run_one, sleep_job, submitter

from agent.client.submitting import make_envelope, submit
from hub.openapi import SPEC

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
ODD_VALUES = ("x", "j" + "0" * 20, "j0.0", "..", "%2e%2e", "a" * 300, "%00", "0" * 64, "ü")
ODD_BODIES: tuple[tuple[bytes, str], ...] = (
    (b"", "application/msgpack"), (b"\xc1\xff", "application/msgpack"), (b"{nope", "application/json"),
    (b"[]", "application/json"), (b'{"slots": "many", "results": 5, "envelope": 1}', "application/json"),
    (b"\x00" * 64, "application/octet-stream"),
)


def described() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in SPEC["paths"].items() for method in item if method in METHODS}


def registered(hub: InProcessHub) -> set[tuple[str, str]]:
    assert hub.server is not None
    routes = set()
    for route in hub.server.app.router.routes():
        if route.method == "HEAD" or route.resource is None:  # HEAD comes with every GET
            continue
        routes.add((route.method, route.resource.canonical))
    return routes


def session(hub: InProcessHub) -> aiohttp.ClientSession:
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    return aiohttp.ClientSession(hub.address.url, connector=connector)


async def test_every_route_is_described_and_vice_versa(hub: InProcessHub) -> None:
    real, spec = registered(hub), described()
    assert len(real) > 15 and ("GET", "/v1/status") in real
    assert real - spec == set(), f"routes missing from hub/openapi.py: {sorted(real - spec)}"
    assert spec - real == set(), f"described but not served: {sorted(spec - real)}"
    for path, item in SPEC["paths"].items():
        params = {p["name"] for op in item.values() for p in op.get("parameters", []) if p["in"] == "path"}
        assert params == set(re.findall(r"{(\w+)}", path)), path
        for op in item.values():
            assert op["responses"] and op["summary"]


async def test_spec_is_served_and_every_ref_resolves(hub: InProcessHub) -> None:
    async with session(hub) as s, s.get("/v1/openapi.json") as resp:
        assert resp.status == 200
        served = await resp.json()
    assert served == json.loads(json.dumps(SPEC)) and served["openapi"].startswith("3.1")
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(SPEC))
    assert refs
    for ref in refs:
        node: Any = SPEC
        for part in ref.split("/"):
            assert part in node, f"dangling $ref #/{ref}"
            node = node[part]
    for schema in SPEC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def validate(value: Any, schema_name: str) -> None:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.Draft202012Validator(root).validate(value)


async def test_public_responses_match_their_schemas(hub: InProcessHub) -> None:
    async with session(hub) as s:
        async with s.get("/v1/status", headers={"Accept": "application/json"}) as resp:
            validate(await resp.json(), "Status")
        client, ident = await agent(hub, "schema", GPU_CAPS)
        sub = await submitter(hub)
        job = await submit(sub, make_envelope(sub.identity, sleep_job(2)))
        await run_one(client, ident)
        await submit(sub, make_envelope(sub.identity, sleep_job(1, "stuck", requires={"min_vram_gb": 64})))
        async with s.get("/v1/status", headers={"Accept": "application/json"}) as resp:
            status = await resp.json()
        validate(status, "Status")
        assert len(status["job_table"]) == 2 and status["agent_table"][0]["done"] == 1
        assert any(row.get("waiting_because") for row in status["job_table"])
        async with s.get(f"/v1/jobs/{job['id']}/public", headers={"Accept": "application/json"}) as resp:
            validate(await resp.json(), "PublicJobDetail")
        await client.close()
        await sub.close()
        status["agents"]["registered"] = "many"
        try:
            validate(status, "Status")
        except jsonschema.ValidationError:
            pass
        else:
            raise AssertionError("the Status schema accepts a non-integer agent count")
        async with s.get("/v1/jobs/j00/public", headers={"Accept": "application/json"}) as resp:
            assert resp.status == 404
            validate(await resp.json(), "Error")


async def test_fuzz_every_operation_gets_no_5xx(hub: InProcessHub) -> None:
    calls = 0
    async with session(hub) as s:
        for path, item in SPEC["paths"].items():
            if path == "/v1/events":
                continue  # an open stream; covered in test_status_page
            names = re.findall(r"{(\w+)}", path)
            values = list(itertools.islice(itertools.product(ODD_VALUES, repeat=len(names)), len(ODD_VALUES)))
            for method in (m for m in item if m in METHODS):
                for fill, (body, content_type) in zip(itertools.cycle(values), ODD_BODIES, strict=False):
                    url = path
                    for name, v in zip(names, fill, strict=True):
                        url = url.replace("{" + name + "}", v)
                    for query in ("", "?state=bogus&limit=-1&wait=x"):
                        async with s.request(method.upper(), url + query, data=body,
                                             headers={"Content-Type": content_type}) as resp:
                            await resp.read()
                            assert resp.status < 500, (method, url + query, body, resp.status)
                            calls += 1
    assert calls > 100
