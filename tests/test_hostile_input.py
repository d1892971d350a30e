"""Authenticate before you parse: hostile headers and bodies over real TLS get one clear 4xx, unparsed."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import msgpack
from conftest import InProcessHub
from test_api import registered, sleep_manifest

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from security.errors import Forbidden
from security.httpsig import sign_request
from security.identity import Identity

MSGPACK = {"Content-Type": "application/msgpack"}
#: the probe that raised a hub's RSS from 66 to 384 MB: ~4 MB of msgpack, an array of empty maps
EMPTY_MAPS = msgpack.packb([{}] * (4 * 1024 * 1024 - 16))


async def raw(hub: InProcessHub, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """One request over real TLS, the body streamed (aiohttp warns about big in-memory bodies)."""
    assert hub.address is not None and hub.address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
            session.request(method, path, data=io.BytesIO(body), headers=headers) as resp:
        data = await resp.read()
        return resp.status, (json.loads(data) if resp.content_type == "application/json"
                             else msgpack.unpackb(data))


async def test_an_unsigned_big_body_is_refused_as_unsigned_before_it_is_decoded(hub: InProcessHub) -> None:
    # Decoded first, this body is a list: the hub would answer 400 "must be a map" (after building 4M maps).
    for path in ("/v1/lease", "/v1/results", "/v1/heartbeat", "/v1/agents", "/v1/jobs"):
        status, reply = await raw(hub, "POST", path, EMPTY_MAPS, MSGPACK)
        assert (status, reply["error"]) == (401, "unsigned"), (path, reply)


async def test_a_body_that_does_not_match_its_signed_digest_is_refused_before_it_is_decoded(
        hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    stranger = Identity.generate()
    for signer, path in ((agent, "/v1/lease"), (stranger, "/v1/agents"), (stranger, "/v1/jobs")):
        headers = {**sign_request(signer, "POST", path, "", b"{}"), **MSGPACK}
        status, reply = await raw(hub, "POST", path, EMPTY_MAPS, headers)
        assert (status, reply["error"]) == (401, "bad_digest"), (path, reply)
    await client.close()


async def test_a_signed_body_with_a_huge_container_is_a_400_naming_the_bound(hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    headers = {**sign_request(agent, "POST", "/v1/lease", "", EMPTY_MAPS), **MSGPACK}
    status, reply = await raw(hub, "POST", "/v1/lease", EMPTY_MAPS, headers)
    assert (status, reply["error"]) == (400, "too_large"), reply
    assert "100000 items" in reply["message"]
    await client.close()


async def test_deeply_nested_json_and_msgpack_are_400s_not_500s(hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    deep_json = b"[" * 200_000 + b"]" * 200_000
    deep_msgpack = b"\x91" * 5000 + b"\xc0"
    nested: list[object] = []
    for _ in range(70):   # deeper than 64, shallower than msgpack's own 1024
        nested = [nested]
    nested_map = msgpack.packb({"slots": 1, "x": nested})
    for body, content_type in ((deep_json, "application/json"), (deep_msgpack, "application/msgpack"),
                               (nested_map, "application/msgpack")):
        headers = {**sign_request(agent, "POST", "/v1/lease", "", body), "Content-Type": content_type}
        status, reply = await raw(hub, "POST", "/v1/lease", body, headers)
        assert (status, reply["error"]) == (400, "too_deep"), reply
        assert "64 levels" in reply["message"]
    # Unsigned, the same JSON is refused for what it lacks, unparsed.
    status, reply = await raw(hub, "POST", "/v1/lease", deep_json, {"Content-Type": "application/json"})
    assert (status, reply["error"]) == (401, "unsigned"), reply
    await client.close()


async def test_a_non_integer_created_in_signature_input_is_a_400(hub: InProcessHub) -> None:
    client, agent = await registered(hub)
    body = msgpack.packb({"slots": 1})
    good = sign_request(agent, "POST", "/v1/lease", "", body)
    created = good["signature-input"].split(";created=")[1].split(";")[0]
    for bad in ('"soon"', '"1e9"', "9" * 5000):
        headers = {**good, **MSGPACK, "signature-input": good["signature-input"].replace(f";created={created}",
                                                                                          f";created={bad}")}
        status, reply = await raw(hub, "POST", "/v1/lease", body, headers)
        assert (status, reply["error"]) == (400, "bad_signature_input"), (bad[:10], reply)
        assert "created must be a Unix time" in reply["message"]
    await client.close()


async def test_an_unknown_submitter_still_gets_a_403_naming_its_key(hub: InProcessHub) -> None:
    """The manifest's key is read from the body only once the signature's digest matched."""
    assert hub.address is not None
    stranger = Identity.generate()
    async with BoardClient(hub.address, stranger, retry_for_s=1) as client:
        try:
            await submit(client, make_envelope(stranger, sleep_manifest()))
        except Forbidden as exc:
            assert stranger.public.text() in exc.message and exc.code == "not_a_submitter"
        else:
            raise AssertionError("an unknown submitter was let in")


def test_a_signature_with_a_huge_nonce_is_refused_before_the_replay_cache_keeps_it() -> None:
    """Review finding: a registered agent's heartbeats with 7 KB nonces left 33 MB in the replay cache in
    6 s (each kept 2 x skew: gigabytes at that rate); a nonce is now at most 128 characters."""
    import base64
    import time

    import pytest

    import security.httpsig as hs
    from security.errors import BadRequest
    agent = Identity.generate()
    body = b"{}"
    headers = {"content-digest": hs.content_digest(body)}
    components = ["@method", "@path", "content-digest"]
    params = f';created={int(time.time())};keyid="{agent.id}";nonce="{"n" * 7000}";alg="ed25519"'
    base = hs._signature_base(components, params, "POST", "/v1/heartbeat", "", headers)
    headers["signature-input"] = f'panal=("@method" "@path" "content-digest"){params}'
    headers["signature"] = "panal=:" + base64.b64encode(agent.sign(base)).decode() + ":"
    with pytest.raises(BadRequest, match="nonce"):
        hs.check_request("POST", "/v1/heartbeat", "", headers, body, 300.0)
