"""The local control socket: a real unix socket served by the real agent daemon, the client, the click commands."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from conftest import InProcessHub

from agent.cli.control import parse_duration, pause_command, resume_command, status_command
from agent.daemon import Daemon, DaemonSettings
from agent.host.home import AgentHome
from agent.volunteer.control import AgentNotRunning, ControlError, ControlServer, control_request, default_socket_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    """The agent's real daemon (not started): its status, pause and resume are what the socket serves."""
    home = AgentHome(tmp_path / "home")
    home.ensure()
    (home.root / "prefs.yaml").write_text("pause_on_battery: false\n")  # this machine's power must not pause it
    return Daemon(home, [], DaemonSettings(drain_s=0), allow_no_board=True)


def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "agent.sock"


async def request(path: Path, op: str, **args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(control_request, path, op, **args)


async def raw(path: Path, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    writer.write(line)
    await writer.drain()
    answer = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return dict(json.loads(answer))


async def test_socket_is_private_and_removed_on_close(tmp_path: Path, daemon: Daemon) -> None:
    path = sock_path(tmp_path)
    async with ControlServer(path, daemon):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # created by the server
        assert sorted(p.name for p in path.parent.iterdir()) == ["agent.sock"]  # no temp name left
    assert not path.exists()


async def test_pause_resume_status_round_trip(tmp_path: Path, daemon: Daemon) -> None:
    path = sock_path(tmp_path)
    async with ControlServer(path, daemon):
        status = await request(path, "status")
        assert (status["state"], status["paused"], status["tasks"]) == ("idle", False, [])
        assert (status["slots"], status["free_slots"], status["agent_id"]) == (1, 1, daemon.identity.id)
        before = datetime.now().astimezone()
        paused = await request(path, "pause", for_s=7200, reason="gaming")
        after = datetime.now().astimezone()
        assert paused["state"] == "paused" and paused["reason"].startswith("gaming (until ")
        until = datetime.fromisoformat(paused["paused_until"])
        assert before + timedelta(hours=2) <= until <= after + timedelta(hours=2)
        assert (await request(path, "status"))["paused"]
        resumed = await request(path, "resume")
        assert (resumed["state"], resumed["paused"], resumed["paused_until"]) == ("idle", False, None)
        forever = await request(path, "pause", for_s=None)
        assert forever["reason"] == "paused by the owner (until `panal agent resume`)"
        assert forever["paused_until"] is None


async def test_bad_requests_get_clear_errors_and_the_server_lives_on(tmp_path: Path, daemon: Daemon) -> None:
    path = sock_path(tmp_path)

    def broken() -> dict[str, Any]:
        raise RuntimeError("status broke")

    async with ControlServer(path, daemon):
        assert await raw(path, b"not json\n") == {"ok": False, "error": "request is not JSON"}
        assert "unknown op 'reboot'" in (await raw(path, b'{"op": "reboot"}\n'))["error"]
        assert "positive number" in (await raw(path, b'{"op": "pause", "for_s": -5}\n'))["error"]
        assert "positive number" in (await raw(path, b'{"op": "pause", "for_s": "2h"}\n'))["error"]
        with pytest.raises(ControlError, match="unknown op 'nope'"):
            await request(path, "nope")
        daemon.status_extras.append(broken)  # an extension (LAN mode adds one) that fails
        with pytest.raises(ControlError, match="the agent failed to handle 'status': status broke"):
            await request(path, "status")
        daemon.status_extras.remove(broken)
        too_big = b'{"op": "status", "pad": "' + b"x" * 100_000 + b'"}\n'
        assert (await raw(path, too_big))["error"] == "request too large"
        status = await request(path, "status")
        assert (status["state"], status["paused"]) == ("idle", False)  # no bad request paused it


async def test_no_agent_running_is_a_clear_error(tmp_path: Path, daemon: Daemon) -> None:
    path = sock_path(tmp_path)
    with pytest.raises(AgentNotRunning, match=r"no agent is running .*panal agent run"):
        await request(path, "status")
    # A socket file left by a dead agent: nothing accepts on it.
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()
    with pytest.raises(AgentNotRunning):
        await request(path, "status")
    # ...and a new agent replaces it.
    async with ControlServer(path, daemon):
        assert (await request(path, "status"))["agent_id"] == daemon.identity.id


async def test_a_second_agent_on_the_same_socket_is_refused(tmp_path: Path, daemon: Daemon) -> None:
    path = sock_path(tmp_path)
    async with ControlServer(path, daemon):
        with pytest.raises(ControlError, match="another agent is already running"):
            await ControlServer(path, daemon).start()
        assert (await request(path, "status"))["agent_id"] == daemon.identity.id  # the first one is untouched


async def test_too_long_a_socket_path_is_explained(tmp_path: Path, daemon: Daemon) -> None:
    path = tmp_path / ("d" * 120) / "agent.sock"
    with pytest.raises(ControlError, match="too long for a unix socket"):
        await ControlServer(path, daemon).start()
    with pytest.raises(ControlError, match="set PANAL_HOME to a shorter directory"):
        control_request(path, "status")


async def test_cli_commands_against_an_agent_running_a_task(tmp_path: Path, busy: Daemon,
                                                             hub: InProcessHub) -> None:
    path = sock_path(tmp_path)
    runner = CliRunner()
    assert hub.address is not None
    async with ControlServer(path, busy):
        result = await asyncio.to_thread(runner.invoke, status_command, ["--socket", str(path)])
        assert result.exit_code == 0, result.output
        assert "state: busy" in result.output and "sleep" in result.output
        assert "free slots: 0 of 1" in result.output  # the one slot is taken by the running task
        result = await asyncio.to_thread(runner.invoke, pause_command, ["--for", "2h", "--socket", str(path)])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("paused for 2h (paused by the owner (until ")
        result = await asyncio.to_thread(runner.invoke, status_command, ["--socket", str(path)])
        assert "state: paused (paused by the owner" in result.output
        result = await asyncio.to_thread(runner.invoke, resume_command, ["--socket", str(path)])
        assert (result.exit_code, result.output) == (0, "resumed\n")
        # A separate process, as a volunteer's shell would run it.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from agent.cli.control import status_command; status_command()",
            "--json", "--socket", str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        status = json.loads(out)
        assert (status["state"], status["free_slots"]) == ("busy", 0)
        assert [(t["kind"], t["board"]) for t in status["tasks"]] == [("sleep", hub.address.url)]
        assert [(b["url"], b["breaker"], b["registered"]) for b in status["boards"]] == [
            (hub.address.url, "closed", True)]


def test_cli_without_an_agent_says_so_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(status_command, ["--socket", str(sock_path(tmp_path))])
    assert result.exit_code == 1
    assert "no agent is running" in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, AgentNotRunning)  # turned into a click error, not raised
    result = CliRunner().invoke(pause_command, ["--for", "soon", "--socket", str(sock_path(tmp_path))])
    assert result.exit_code == 2 and "not a duration like" in result.output


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                               ("1d", 86400), ("45", 45), ("1.5h", 5400)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2x", "0", "-5", "2h junk", "inf"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(click.BadParameter, match=r"duration|zero"):
        parse_duration(text)


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PANAL_HOME", str(tmp_path))
    assert default_socket_path() == tmp_path / "agent.sock"
    monkeypatch.delenv("PANAL_HOME")
    runtime = tmp_path / "runtime"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert default_socket_path() == runtime / "panal" / "agent.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")  # no guessable /tmp fallback: the private home instead
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_socket_path() == tmp_path / "data" / "panal" / "agent.sock"


async def test_a_world_writable_directory_is_refused(tmp_path: Path, daemon: Daemon) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ControlError, match="writable by every user"):
        await ControlServer(shared / "agent.sock", daemon).start()
