"""Several hubs for one board: join URLs carry every hub, standbys answer 503 and point at the active
hub, and the client moves to whichever hub is active (real TLS hubs, elections on a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import ROOT, panal
from pgserver import PgServer

from agent.client.blobcache import download_blob
from agent.client.board import BoardClient
from agent.client.submitting import upload_inputs
from hub.config import HubConfig
from hub.election import Election
from hub.home import HubHome
from hub.server import BoardServer
from security.errors import BadRequest
from security.httpsig import sign_request
from security.identity import Identity
from security.tls import BoardAddress, server_context

A_PIN, B_PIN = "a" * 64, "b" * 64


def test_a_join_url_carries_every_hub_each_pinned_to_its_own_certificate() -> None:
    text = f"https://h1:8747/#sha256={A_PIN}&token=t.k&also=h2:8748@{B_PIN}&also=[::1]:9@{A_PIN}"
    address = BoardAddress.parse(text)
    assert [(h.url, h.fingerprint) for h in address.hubs()] == [
        ("https://h1:8747", A_PIN), ("https://h2:8748", B_PIN), ("https://[::1]:9", A_PIN)]
    assert BoardAddress.parse(address.join_url()) == address
    assert "token=t.k&also=h2:8748@" in address.join_url(token="t.k")


@pytest.mark.parametrize("also", ["h2", "h2:8748", f"user@h2:8748@{B_PIN}", f"h2:8748@{B_PIN[:10]}",
                                  f"h2:8748/path@{B_PIN}", f"[::1:8748@{B_PIN}", f"h2:8748?x=1@{B_PIN}",
                                  f"h2:8748#x@{B_PIN}"])
def test_a_join_url_naming_another_hub_badly_is_refused_by_name(also: str) -> None:
    with pytest.raises(BadRequest, match="also="):
        BoardAddress.parse(f"https://h1:8747/#sha256={A_PIN}&also={also}")


def test_a_board_url_with_a_broken_ipv6_address_is_a_clear_error_not_a_traceback() -> None:
    """urlsplit raises ValueError on an unclosed ``[``: a client moving to the hub a standby names would
    crash on it (only BadRequest is expected there), and ``panal agent join`` would print a traceback."""
    with pytest.raises(BadRequest, match="not a board URL"):
        BoardAddress.parse(f"https://[::1:8747/#sha256={A_PIN}")


def test_plain_http_to_another_hub_off_loopback_is_refused() -> None:
    with pytest.raises(BadRequest, match="plain HTTP"):
        BoardAddress.parse("http://127.0.0.1:1/#also=example.org:2").check_transport()


class Candidate:
    """A hub over real TLS on 127.0.0.1:0 with the board's PostgreSQL store at ``dsn``, running for election."""

    def __init__(self, tmp: Path, name: str, dsn: str) -> None:
        self.home = HubHome(tmp / name)
        self.home.init("127.0.0.1", 0)
        config = self.home.config(bind="127.0.0.1", port=0, hub_id=name, election_check_interval_s=0.1,
                                  store=dsn, blobs_dir=str(tmp / "blobs"))
        self.election = Election(dsn, name, "", check_interval_s=0.1, timeout_s=1.0)
        self.server = BoardServer(config, self.home.db_path,
                                  server_context(self.home.cert_path, self.home.tls_key_path),
                                  election=self.election)
        self.config = config
        self.address = BoardAddress("")
        self.activating: asyncio.Task[None] | None = None

    async def start(self) -> None:
        port = await self.server.start()
        self.address = self.home.address(self.config, port)
        self.activating = asyncio.create_task(self.server.activate(self.address.join_url()))

    async def stop(self) -> None:
        if self.activating is not None:
            self.activating.cancel()
            await asyncio.gather(self.activating, return_exceptions=True)
        await self.server.stop(drain=False)


async def _raw_get(address: BoardAddress, path: str) -> tuple[int, dict[str, str], object]:
    assert address.fingerprint
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(address.fingerprint)))
    async with aiohttp.ClientSession(address.url, connector=connector) as session, \
            session.get(path, headers={"Accept": "application/json"}) as resp:
        return resp.status, dict(resp.headers), json.loads(await resp.read())


async def test_a_standby_says_503_and_who_is_active_and_the_client_follows_the_active_hub_blobs_too(
        tmp_path: Path, pg: str) -> None:
    first, second = Candidate(tmp_path, "hub-a", pg), Candidate(tmp_path, "hub-b", pg)
    await first.start()
    assert first.activating is not None
    await first.activating                      # hub-a is active
    await second.start()                        # hub-b waits
    while second.election.last_known is None:
        await asyncio.sleep(0.02)
    status, headers, body = await _raw_get(second.address, "/v1/limits")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert isinstance(body, dict) and body["error"] == "standby"
    assert body["details"]["active_hub"] == first.address.join_url()
    # the client is given the standby first: it is sent on to the active hub, which answers
    board = BoardAddress(second.address.url, second.address.fingerprint, (first.address,))
    me = Identity.generate()
    await first.server.add_submitter(me.public, "tester")      # (in the shared store)
    data = tmp_path / "input.bin"
    data.write_bytes(b"shared by both hubs" * 1000)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    async with BoardClient(board, me, retry_for_s=30.0) as client:
        limits = await client.call("GET", "/v1/limits")
        assert isinstance(limits, dict) and client.base_url == first.address.url
        await upload_inputs(client, [(sha, data)])              # written by hub-a into the shared blobs_dir
        # the active hub dies (its lock session ends, as with kill -9): it stops answering at once,
        # the standby takes over, and the same client's next call is answered by it
        first.election._conn.terminate()
        await first.election.lost.wait()
        assert (await _raw_get(first.address, "/v1/limits"))[0] == 503
        assert second.activating is not None
        await second.activating
        assert isinstance(await client.call("GET", "/v1/limits"), dict)
        assert client.base_url == second.address.url
        back = tmp_path / "back.bin"                            # and read back from hub-b
        await download_blob(client.session(), client.base_url, sha, back,
                            sign_request(me, "GET", f"/v1/blobs/{sha}", "", b""))
        assert back.read_bytes() == data.read_bytes()
    status, _, body = await _raw_get(second.address, "/v1/active")
    assert status == 200 and isinstance(body, dict) and body["active"] is True
    assert body["active_hub"]["hub"] == "hub-b" and body["active_hub"]["token"] == 2
    await first.stop()
    await second.stop()


async def test_hub_status_names_the_active_hub_and_how_the_database_answers(
        tmp_path: Path, own_pg: PgServer) -> None:
    # a long idle limit: on a busy machine this process may not run its watchdog for seconds, and this test
    # reads the status, not how fast a quiet hub loses the lock (tests/test_election.py does)
    election = Election(own_pg.url(), "hub-a", "https://hub-a:8747/", check_interval_s=0.1, timeout_s=30)
    await election.campaign()
    home = tmp_path / "user"
    panal("hub", "init", "--dir", str(tmp_path / "hub"), home=home)
    proc = await asyncio.to_thread(panal, "hub", "status", "--dir", str(tmp_path / "hub"), "--json", home=home,
                                   PANAL_HUB_STORE=own_pg.url())
    status = json.loads(proc.stdout)
    assert status["database"] == "reachable" and status["lock_held"] is True
    assert status["active"]["hub"] == "hub-a" and status["active"]["token"] == 1
    await election.resign()
    own_pg.stop()
    proc = await asyncio.to_thread(panal, "hub", "status", "--dir", str(tmp_path / "hub"), home=home,
                                   check=False, PANAL_HUB_STORE=own_pg.url())
    assert proc.returncode == 1 and "database: UNREACHABLE" in proc.stdout
    own_pg.restart()


def test_the_compose_file_runs_two_hubs_on_one_database_with_real_settings_and_commands() -> None:
    compose = yaml.safe_load((ROOT / "packaging" / "docker-compose.ha.yml").read_text())
    services = compose["services"]
    hubs = [s for s in services.values() if s.get("command", [None])[0] == "hub"]
    assert len(hubs) == 2 and "postgres" in services
    fields = set(HubConfig.__dataclass_fields__)
    for hub in hubs:
        assert hub["command"][:2] == ["hub", "serve"]
        env = hub["environment"]
        assert env["PANAL_HUB_STORE"].startswith("postgresql://") and "/blobs" in hub["volumes"][1]
        for name in env:
            if name.startswith("PANAL_HUB_") and name != "PANAL_HUB_HOST":
                assert name.removeprefix("PANAL_HUB_").lower() in fields, name
        assert env["PANAL_HUB_BLOBS_DIR"] == "/blobs"
    assert {h["environment"]["PANAL_HUB_HUB_ID"] for h in hubs} == {"hub-a", "hub-b"}
