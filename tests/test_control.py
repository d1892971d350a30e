"""The local control socket: a real unix socket, the sync client, and the click commands."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from agent.control import AgentNotRunning, ControlError, ControlServer, control_request, default_socket_path
from agent.control_cli import parse_duration, pause_command, resume_command, status_command
from agent.pause_rules import PauseRules
from agent.preferences import Preferences

ROOT = Path(__file__).resolve().parent.parent


class Load:
    def owner_cpu_percent(self) -> float:
        return 0.0

    def seconds_since_input(self) -> float | None:
        return None

    def on_battery(self) -> bool | None:
        return None


class Handler:
    """What the agent daemon will expose: pause rules plus a task list."""

    def __init__(self) -> None:
        self.rules = PauseRules(Preferences(), Load())
        self.calls: list[tuple[str, Any]] = []
        self.fail_status = False

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status broke")
        paused, reason = self.rules.evaluate()
        return {"state": "paused" if paused else "running", "paused": paused, "reason": reason,
                "tasks": [{"id": "t-1", "kind": "matmul", "progress": 0.25, "board": "https://hub:8747"}],
                "boards": [{"url": "https://hub:8747", "breaker": "closed"}], "slots_free": 0}

    def pause(self, for_s: float | None, reason: str) -> None:
        self.calls.append(("pause", (for_s, reason)))
        self.rules.pause(for_s, reason)

    def resume(self) -> None:
        self.calls.append(("resume", None))
        self.rules.resume()


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


async def test_socket_is_private_and_removed_on_close(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    async with ControlServer(path, Handler()):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # created by the server
        assert sorted(p.name for p in path.parent.iterdir()) == ["agent.sock"]  # no temp name left
    assert not path.exists()


async def test_pause_resume_status_round_trip(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    handler = Handler()
    async with ControlServer(path, handler):
        status = await request(path, "status")
        assert status["state"] == "running" and status["tasks"][0]["progress"] == 0.25
        paused = await request(path, "pause", for_s=7200, reason="gaming")
        assert paused["paused"] and paused["reason"].startswith("gaming (until ")
        assert handler.calls == [("pause", (7200.0, "gaming"))]
        assert (await request(path, "status"))["paused"]
        resumed = await request(path, "resume")
        assert resumed["state"] == "running"
        forever = await request(path, "pause", for_s=None)
        assert "panal agent resume" in forever["reason"]
        assert handler.calls[-1] == ("pause", (None, "paused by the owner"))


async def test_bad_requests_get_clear_errors_and_the_server_lives_on(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    handler = Handler()
    async with ControlServer(path, handler):
        assert await raw(path, b"not json\n") == {"ok": False, "error": "request is not JSON"}
        assert "unknown op 'reboot'" in (await raw(path, b'{"op": "reboot"}\n'))["error"]
        assert "positive number" in (await raw(path, b'{"op": "pause", "for_s": -5}\n'))["error"]
        assert "positive number" in (await raw(path, b'{"op": "pause", "for_s": "2h"}\n'))["error"]
        with pytest.raises(ControlError, match="unknown op 'nope'"):
            await request(path, "nope")
        handler.fail_status = True
        with pytest.raises(ControlError, match="the agent failed to handle 'status': status broke"):
            await request(path, "status")
        handler.fail_status = False
        too_big = b'{"op": "status", "pad": "' + b"x" * 100_000 + b'"}\n'
        assert (await raw(path, too_big))["error"] == "request too large"
        assert (await request(path, "status"))["state"] == "running"
        assert handler.calls == []


async def test_no_agent_running_is_a_clear_error(tmp_path: Path) -> None:
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
    async with ControlServer(path, Handler()):
        assert (await request(path, "status"))["state"] == "running"


async def test_a_second_agent_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    async with ControlServer(path, Handler()):
        with pytest.raises(ControlError, match="another agent is already running"):
            await ControlServer(path, Handler()).start()
        assert (await request(path, "status"))["state"] == "running"  # the first one is untouched


async def test_too_long_a_socket_path_is_explained(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "agent.sock"
    with pytest.raises(ControlError, match="too long for a unix socket"):
        await ControlServer(path, Handler()).start()
    with pytest.raises(ControlError, match="set PANAL_HOME to a shorter directory"):
        control_request(path, "status")


async def test_cli_commands_against_a_running_agent(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    handler = Handler()
    runner = CliRunner()
    async with ControlServer(path, handler):
        result = await asyncio.to_thread(runner.invoke, pause_command, ["--for", "2h", "--socket", str(path)])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("paused for 2h")
        assert handler.calls == [("pause", (7200.0, "paused by the owner"))]
        result = await asyncio.to_thread(runner.invoke, status_command, ["--socket", str(path)])
        assert result.exit_code == 0, result.output
        assert "state: paused" in result.output and "t-1" in result.output and "25%" in result.output
        assert "slots_free: 0" in result.output
        result = await asyncio.to_thread(runner.invoke, resume_command, ["--socket", str(path)])
        assert (result.exit_code, result.output) == (0, "resumed\n")
        # A separate process, as a volunteer's shell would run it.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from agent.control_cli import status_command; status_command()",
            "--json", "--socket", str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert json.loads(out)["boards"] == [{"url": "https://hub:8747", "breaker": "closed"}]


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


async def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ControlError, match="writable by every user"):
        await ControlServer(shared / "agent.sock", Handler()).start()
