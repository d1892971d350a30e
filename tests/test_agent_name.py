"""Privacy by default: an agent appears under a name generated from its key (or one its volunteer chose),
never under the machine's hostname: not in its registration, not on the board's status, not in the
certificate its LAN board shows to peers."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from conftest import InProcessHub
from helpers import wait_for_async

from agent.cli.agent import agent as agent_group
from agent.daemon import Daemon, DaemonSettings
from agent.host.home import AgentHome
from agent.volunteer.naming import agent_name, generated_name, load_name, save_name
from hub.home import HubHome
from security.errors import BadRequest
from security.identity import Identity
from security.tls import cert_dns_names, make_self_signed


def test_the_generated_name_is_stable_per_key_and_differs_between_keys() -> None:
    ids = [Identity.generate().id for _ in range(20)]
    names = [generated_name(i) for i in ids]
    assert names == [generated_name(i) for i in ids]
    assert all(re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", n) for n in names), names
    assert len(set(names)) == len(names)
    assert socket.gethostname() not in names


def test_a_chosen_name_is_kept_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    ident = Identity.generate()
    assert agent_name(tmp_path, ident.id) == generated_name(ident.id)
    assert save_name(tmp_path, "  lab-box  ") == "lab-box"
    assert load_name(tmp_path) == "lab-box" and agent_name(tmp_path, ident.id) == "lab-box"
    assert agent_name(tmp_path, ident.id, "this-run") == "this-run"
    for bad, why in (("", "empty"), ("x" * 65, "at most 64"), ("evil\x1b[2Jname", "control characters")):
        with pytest.raises(BadRequest, match=why):
            save_name(tmp_path, bad)
    assert load_name(tmp_path) == "lab-box"


async def _public_status(hub: InProcessHub) -> tuple[str, dict[str, Any]]:
    assert hub.address is not None and hub.address.fingerprint is not None
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(bytes.fromhex(hub.address.fingerprint)))
    async with aiohttp.ClientSession(hub.address.url, connector=connector) as session, \
            session.get("/v1/status", headers={"Accept": "application/json"}) as resp:
        text = await resp.text()
    return text, json.loads(text)


async def test_a_running_agent_registers_under_its_generated_name_not_the_hostname(
        tmp_path: Path, hub: InProcessHub) -> None:
    home = AgentHome(tmp_path / "home")
    home.ensure()
    (home.root / "prefs.yaml").write_text("pause_on_battery: false\n")
    daemon = Daemon(home, [], DaemonSettings(drain_s=0), allow_no_board=True)
    assert hub.address is not None and hub.server is not None
    link = daemon.add_board(hub.address)
    try:
        await wait_for_async(lambda: link.registered, "the agent to register")
        expected = generated_name(daemon.identity.id)
        text, _ = await _public_status(hub)
        assert expected in text
        names = set(re.findall(r'"(?:agent_)?name":\s*"([^"]*)"', text))
        assert expected in names and socket.gethostname() not in names
    finally:
        await daemon.shutdown()


async def test_join_name_through_the_cli_is_what_the_board_shows(tmp_path: Path, hub: InProcessHub,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.address is not None
    monkeypatch.setenv("PANAL_HOME", str(tmp_path / "agent-home"))
    result = await asyncio.to_thread(CliRunner().invoke, agent_group,
                                     ["join", hub.address.join_url(), "--name", "garage-box"])
    assert result.exit_code == 0, result.output
    assert "shown as 'garage-box'" in result.output
    assert load_name(tmp_path / "agent-home") == "garage-box"
    text, _ = await _public_status(hub)
    assert "garage-box" in text
    bad = await asyncio.to_thread(CliRunner().invoke, agent_group, ["join", hub.address.join_url(), "--name", " "])
    assert bad.exit_code == 2 and "cannot be empty" in bad.output and "Traceback" not in bad.output


def test_a_lan_board_certificate_does_not_name_the_host(tmp_path: Path) -> None:
    hub_home = HubHome(tmp_path / "lan")
    hub_home.init("127.0.0.1", 0, None, False)
    assert socket.gethostname() not in cert_dns_names(hub_home.cert_path)
    # A certificate an older version made with the hostname is replaced.
    make_self_signed(hub_home.cert_path, hub_home.tls_key_path, ["127.0.0.1"])
    assert socket.gethostname() in cert_dns_names(hub_home.cert_path)
    hub_home.init("127.0.0.1", 0, None, False)
    assert socket.gethostname() not in cert_dns_names(hub_home.cert_path)
    # A hub's own certificate still names its host (its operator's choice, `panal hub init`).
    hub2 = HubHome(tmp_path / "hub")
    hub2.init("127.0.0.1", 0)
    assert socket.gethostname() in cert_dns_names(hub2.cert_path)
