"""Admission: a hub on the internet registers new agents only with a token from its join URL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest
from conftest import InProcessHub, Procs, panal, start_hub_proc
from helpers import scaled
from test_api import raw

from hub.admission import TOKEN_HEADER
from hub.tokens import new_token
from security.httpsig import sign_request
from security.identity import Identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(240))]


def registration(agent: Identity) -> bytes:
    return msgpack.packb({"public_key": agent.public.text(), "name": "a", "capabilities": {"kinds": ["sleep"]}})


async def register(hub: InProcessHub, agent: Identity, token: str | None = None) -> tuple[int, dict[str, str]]:
    body = registration(agent)
    headers = {**sign_request(agent, "POST", "/v1/agents", "", body), "Content-Type": "application/msgpack"}
    if token is not None:
        headers[TOKEN_HEADER] = token
    return await raw(hub, "POST", "/v1/agents", body, headers)


def test_a_wan_hub_admits_agents_only_with_a_live_token_end_to_end(procs: Procs, tmp_path: Path) -> None:
    user = tmp_path / "owner"
    _, bare_url = start_hub_proc(procs, tmp_path, user, bind="0.0.0.0")   # a hub on the internet: the default
    hub_dir = str(tmp_path / "hub")

    def create(*args: str) -> str:
        out = panal("hub", "tokens", "create", "--dir", hub_dir, *args, home=user).stdout
        return out.strip().splitlines()[-1]

    def join(url: str, name: str) -> tuple[int, str]:
        proc = panal("agent", "join", url, "--name", name, home=tmp_path / name, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    single = create("--uses", "1", "--label", "one volunteer")
    assert "&token=" in single and single.startswith(bare_url.split("#")[0])
    code, out = join(single, "first")
    assert code == 0 and "joined" in out, out
    code, out = join(single, "second")   # a single-use token admits one agent
    assert code != 0 and "used up" in out and "panal hub tokens create" in out, out

    multi = create("--uses", "0", "--expires", "1h")
    token_id = multi.split("&token=")[1].split(".")[0]
    panal("hub", "tokens", "revoke", "--dir", hub_dir, token_id, home=user)
    code, out = join(multi, "third")
    assert code != 0 and "revoked" in out, out

    code, out = join(bare_url, "fourth")   # no token at all
    assert code != 0 and "needs an admission token" in out, out

    listed = panal("hub", "tokens", "list", "--dir", hub_dir, home=user).stdout
    assert "used_up" in listed and "revoked" in listed and "one volunteer" in listed, listed
    secret = single.split("&token=")[1].split(".", 1)[1]
    assert secret.encode() not in (tmp_path / "hub" / "board.db").read_bytes()   # kept hashed only
    # The agent admitted once re-registers without a token (a restarted `panal agent run` does).
    code, out = join(single.split("&token=")[0], "first")
    assert code == 0, out


async def test_expired_unknown_and_missing_tokens_are_403s_naming_the_reason(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, registration="token")
    server = await hub.start()
    try:
        expired, expired_text = new_token("old", 1, time.time() - 7200, 3600)
        await server.board.store.add_admission_token(expired)
        for token, code in ((None, "token_missing"), (expired_text, "token_expired"),
                            ("0badc0de.not-a-token-we-issued-at-all", "token_unknown"), ("garbage", "token_unknown")):
            status, reply = await register(hub, Identity.generate(), token)
            assert (status, reply["error"]) == (403, code), reply
            assert "panal hub tokens create" in reply["message"]
        assert not server.board.agents
    finally:
        await hub.stop()


async def test_a_forged_registration_does_not_use_up_the_token(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, registration="token")
    server = await hub.start()
    try:
        row, text = new_token("one", 1, time.time(), 3600)
        await server.board.store.add_admission_token(row)
        agent, other = Identity.generate(), Identity.generate()
        body = registration(agent)
        forged = {**sign_request(other, "POST", "/v1/agents", "", body), "Content-Type": "application/msgpack",
                  TOKEN_HEADER: text}
        status, reply = await raw(hub, "POST", "/v1/agents", body, forged)
        assert (status, reply["error"]) == (401, "bad_signature"), reply
        assert (await register(hub, agent, text))[0] == 200
        status, reply = await register(hub, Identity.generate(), text)
        assert (status, reply["error"]) == (403, "token_used_up"), reply
    finally:
        await hub.stop()


async def test_the_token_names_the_owner_of_the_agents_it_admits(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, registration="token")
    server = await hub.start()
    try:
        row, text = new_token("alice's machines", 0, time.time(), 3600, owner="alice")
        await server.board.store.add_admission_token(row)
        agent = Identity.generate()
        assert (await register(hub, agent, text))[0] == 200
        assert (await register(hub, agent, None))[0] == 200          # re-registration: no token, same owner
        assert server.board.agents[agent.id].row.owner == "alice"
        assert {r.id: r.owner for r in await server.board.store.list_agents()}[agent.id] == "alice"
    finally:
        await hub.stop()


async def test_open_registration_is_rate_limited_per_address_with_retry_after(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, registration="open", registration_burst=2, registration_rate_per_min=1)
    await hub.start()
    try:
        assert [(await register(hub, Identity.generate()))[0] for _ in range(2)] == [200, 200]
        status, reply = await register(hub, Identity.generate())
        assert (status, reply["error"]) == (429, "registration_rate_limited"), reply
        assert "retry in" in reply["message"]
        assert hub.address is not None and hub.address.fingerprint
        agent = Identity.generate()
        body = registration(agent)
        connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
        async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
                session.post("/v1/agents", data=body, headers=sign_request(agent, "POST", "/v1/agents", "", body)) \
                as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 30
    finally:
        await hub.stop()


async def test_concurrent_registrations_with_a_new_token_all_see_it(tmp_path: Path) -> None:
    """While one registration re-reads the token table, the others wait for that read rather than look the
    token up in the stale (here: empty) table and get a 403 `token_unknown` for a token the admin just made
    (found by `panal bench abuse`: 50 agents joining at once with one fresh token)."""
    hub = InProcessHub(tmp_path, registration="token")
    server = await hub.start()
    try:
        row, text = new_token("fleet", 0, time.time(), 3600)
        await server.board.store.add_admission_token(row)
        replies = await asyncio.gather(*(register(hub, Identity.generate(), text) for _ in range(20)))
        assert [status for status, _ in replies] == [200] * 20, [reply for _, reply in replies]
    finally:
        await hub.stop()
