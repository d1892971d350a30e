"""``PANAL_EVENT_LOOP=uvloop`` (agent/eventloop.py): a real hub serves on uvloop as on asyncio's loop (its own TLS
and connection guard included), and a name it does not know, or uvloop missing, is a clear error."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from conftest import Procs, panal, start_hub_proc
from test_lease_commit_in_flight import lease, signed_result
from test_single_task_path import manifest

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, run_job
from agent.eventloop import loop_factory
from jobs.protocol_registration import Registered, Registration
from jobs.requirements import Capabilities
from security.errors import BadRequest
from security.identity import Identity
from security.tls import BoardAddress

pytest.importorskip("uvloop")


def test_a_hub_on_uvloop_runs_a_task_from_submit_to_result_and_still_refuses_plain_http(
        procs: Procs, tmp_path: Path) -> None:
    user_home = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user_home, PANAL_EVENT_LOOP="uvloop")
    user, agent = Identity.load(user_home / "user.key"), Identity.generate()

    async def one_task() -> None:
        address = BoardAddress.parse(url)
        async with BoardClient(address, user) as submitter, BoardClient(address, agent) as link:
            await link.post("/v1/agents", Registration(agent.public, "a", Capabilities.from_dict(
                {"kinds": ["sleep"]})), Registered.decode)

            async def run_agent() -> None:
                [task] = await lease(link)
                await link.call("POST", "/v1/results", {"results": [signed_result(agent, task).to_wire()]})
            running = asyncio.create_task(run_agent())
            final = await run_job(submitter, make_envelope(user, manifest(1)), 30.0)
            await running
            assert final["state"] == "succeeded" and final["tasks"] == {"done": 1}
    asyncio.run(one_task())
    assert "event loop: uvloop" in procs.logs_text()

    host, port = BoardAddress.parse(url).url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as plain:
        plain.sendall(b"GET /v1/limits HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = plain.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"HTTPS" in answer


def test_an_unknown_event_loop_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = panal("hub", "init", "--dir", str(tmp_path / "hub"), home=tmp_path / "user", check=False,
                 PANAL_EVENT_LOOP="twisted")
    assert proc.returncode != 0 and "PANAL_EVENT_LOOP='twisted': expected asyncio or uvloop" in proc.stderr
    monkeypatch.setenv("PANAL_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)   # as if the extra were not installed
    with pytest.raises(BadRequest, match=r"pip install 'panal\[uvloop\]'"):
        loop_factory()


