"""`panal agent status` for a person, through the real control socket of a real daemon pulling from a
real board: state and why, free slots while idle, totals, credit as the board counts it (also for an
agent that starts paused), board health, and the commands to pause, stop and uninstall."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import InProcessHub
from helpers import wait_for_async

from agent.cli.control import status_command
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.daemon import Daemon, DaemonSettings
from agent.host.home import AgentHome
from agent.volunteer.control import ControlServer
from jobs.manifest import Manifest
from security.identity import Identity

ROOT = Path(__file__).resolve().parent.parent


def make_daemon(root: Path) -> Daemon:
    home = AgentHome(root)
    home.ensure()
    (home.root / "prefs.yaml").write_text("pause_on_battery: false\n")  # this machine's power must not pause it
    return Daemon(home, [], DaemonSettings(drain_s=0, poll_wait_s=0.5), allow_no_board=True)


async def status_text(path: Path) -> str:
    result = await asyncio.to_thread(CliRunner().invoke, status_command, ["--socket", str(path)])
    assert result.exit_code == 0, result.output
    return str(result.output)


async def status_json(path: Path) -> dict[str, object]:
    """As a volunteer's shell runs it: a separate process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from agent.cli.control import status_command; status_command()",
        "--json", "--socket", str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return dict(json.loads(out))


async def test_an_idle_agent_reports_its_slot_free_and_why_it_waits(tmp_path: Path, hub: InProcessHub) -> None:
    daemon = make_daemon(tmp_path / "home")
    assert hub.address is not None
    path = tmp_path / "run" / "agent.sock"
    link = daemon.add_board(hub.address)
    try:
        async with ControlServer(path, daemon):
            # The lease loop holds the slot in its long poll; the status must still call it free.
            await wait_for_async(lambda: link.registered and daemon.slots.free == 0, "the agent to poll the board")
            status = await status_json(path)
            assert (status["state"], status["free_slots"], status["slots"]) == ("idle", 1, 1)
            assert status["why"] == "waiting for work from 1 board(s)"
            text = await status_text(path)
            assert "state: idle (waiting for work from 1 board(s))" in text
            assert "free slots: 1 of 1" in text
            assert "tasks since start: 0 done, 0 failed" in text and "credit earned: 0" in text
            boards_table = text.split("no tasks running")[1].split("commands:")[0]
            assert re.search(r"\bok\b", boards_table), text   # the board's health, in words
            for command in ("panal agent pause", "panal agent service stop", "panal agent service uninstall"):
                assert command in text
    finally:
        await daemon.shutdown()


async def test_done_tasks_and_the_credit_the_board_grants_show_up(tmp_path: Path, hub: InProcessHub,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANAL_WORKER_PRELOAD", "0")  # a sleep worker needs no torch
    assert hub.server is not None and hub.address is not None
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "user")
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "short"},
                                   "spec": {"task": "sleep", "params": {"seconds": 0.2}}})
    async with BoardClient(hub.address, user) as client:
        await submit(client, make_envelope(user, manifest))
    daemon = make_daemon(tmp_path / "home")
    path = tmp_path / "run" / "agent.sock"
    daemon.add_board(hub.address)
    try:
        async with ControlServer(path, daemon):
            await wait_for_async(lambda: daemon.status()["done"] == 1 and float(daemon.status()["credit"]) > 0,
                                 "the task to finish and the board to grant its credit")
            text = await status_text(path)
            assert "tasks since start: 1 done, 0 failed" in text
            credit = float(daemon.status()["credit"])
            assert f"credit earned: {credit}" in text
    finally:
        await daemon.shutdown()

    # Restarted and paused before it asks for work: the registration reply already carries its credit.
    again = make_daemon(tmp_path / "home")
    again.pause(None, "paused by the owner")
    link = again.add_board(hub.address)
    try:
        await wait_for_async(lambda: link.registered, "the restarted agent to register")
        status = again.status()
        assert status["state"] == "paused" and str(status["why"]).startswith("paused by the owner")
        assert status["credit"] == credit
    finally:
        await again.shutdown()
