"""The agent's local control socket: ``panal agent pause|resume|status`` talk to the running agent.

A unix socket readable and writable by its owner only (0600), so only the volunteer (or root)
can pause or inspect the agent: there is no other authentication. The socket is bound under a
temporary name, chmod-ed, then renamed into place, so it is never reachable with looser
permissions. A live socket at the path means an agent is already running; a dead one is
replaced. The protocol is newline-delimited JSON: ``{"op": "status"|"pause"|"resume", ...}``
answered by ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
Windows (named pipes) is not supported yet: the server and client raise a clear error there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Protocol

import platformdirs

from agent.host.home import default_home
from security.errors import PanalError, Unavailable

__all__ = [
    "AgentNotRunning",
    "ControlError",
    "ControlHandler",
    "ControlServer",
    "control_request",
    "default_socket_path",
]

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
MAX_REQUEST_BYTES = 64 * 1024
CLIENT_TIMEOUT_S = 5.0
_SUN_PATH_MAX = 104  # the smallest sockaddr_un.sun_path (macOS); Linux allows 108


class ControlError(PanalError):
    """The control request failed; ``message`` is for the volunteer."""

    status = 400
    code = "control"


class AgentNotRunning(Unavailable):
    """No agent answers on the control socket."""

    code = "agent_not_running"


class ControlHandler(Protocol):
    """What the agent exposes to the control socket. Calls run on the agent's event loop and
    must be quick (no blocking I/O)."""

    def status(self) -> dict[str, Any]: ...

    def pause(self, for_s: float | None, reason: str) -> None: ...

    def resume(self) -> None: ...


def default_socket_path() -> Path:
    """``$PANAL_HOME/agent.sock`` when PANAL_HOME is set (services, tests, several agents on one
    machine), else the per-user runtime dir, which the OS keeps private and cleans at logout.
    Without XDG_RUNTIME_DIR (containers, some services) platformdirs would fall back to a
    guessable directory under /tmp that another user could create first; the agent's own
    private home is used instead."""
    home = os.environ.get("PANAL_HOME")
    if home:
        return Path(home) / SOCKET_NAME
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")) and not os.environ.get("XDG_RUNTIME_DIR"):
        return default_home() / SOCKET_NAME
    return Path(platformdirs.user_runtime_dir("panal", appauthor=False)) / SOCKET_NAME


def _require_unix() -> None:
    if sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
        raise ControlError("the control socket is not supported on Windows yet; "
                           "stop the agent with `panal agent service stop`")


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        raise ControlError(f"control socket path {path} is too long for a unix socket "
                           f"({_SUN_PATH_MAX - 1} bytes at most): set PANAL_HOME to a shorter directory")


def _alive(path: Path) -> bool:
    """True when something accepts connections on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves ``handler`` on ``path`` until closed. Use as ``async with ControlServer(...)``."""

    def __init__(self, path: Path, handler: ControlHandler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        _require_unix()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        _check_length(tmp)
        parent_existed = self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not parent_existed:
            self.path.parent.chmod(0o700)
        parent_mode = self.path.parent.stat().st_mode
        if parent_mode & stat.S_IWOTH and not parent_mode & stat.S_ISVTX:
            raise ControlError(f"{self.path.parent} is writable by every user, who could replace the "
                               "control socket: choose a private directory (PANAL_HOME)")
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"another agent is already running (its control socket is {self.path})")
            self.path.unlink()  # left behind by an agent that died
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ControlError(f"cannot create the control socket {self.path}: {exc.strerror}") from exc

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the limit
                    await self._reply(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                await self._reply(writer, self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        writer.write(json.dumps(body, default=str).encode() + b"\n")
        await writer.drain()

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object with an 'op'"}
        op = request.get("op")
        try:
            if op == "status":
                return {"ok": True, "result": self.handler.status()}
            if op == "pause":
                for_s = request.get("for_s")
                if for_s is not None and (isinstance(for_s, bool) or not isinstance(for_s, int | float)
                                          or not math.isfinite(for_s) or for_s <= 0):
                    return {"ok": False, "error": "for_s must be a positive number of seconds or null"}
                reason = request.get("reason") or "paused by the owner"
                if not isinstance(reason, str):
                    return {"ok": False, "error": "reason must be a string"}
                self.handler.pause(None if for_s is None else float(for_s), reason[:200])
                return {"ok": True, "result": self.handler.status()}
            if op == "resume":
                self.handler.resume()
                return {"ok": True, "result": self.handler.status()}
        except PanalError as exc:
            return {"ok": False, "error": exc.message}
        except Exception as exc:  # the agent must outlive a bad handler call
            log.exception("control request %r failed", op)
            return {"ok": False, "error": f"the agent failed to handle {op!r}: {exc}"}
        return {"ok": False, "error": f"unknown op {op!r}: expected status, pause or resume"}


def control_request(socket_path: Path, op: str, *, timeout_s: float = CLIENT_TIMEOUT_S,
                    **args: Any) -> dict[str, Any]:
    """Send one request to the running agent and return its ``result``.

    Raises :class:`AgentNotRunning` when nothing listens there and :class:`ControlError` for
    anything else (permissions, timeouts, an error answer)."""
    _require_unix()
    _check_length(socket_path)
    payload = json.dumps({"op": op, **args}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(os.fspath(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunning(f"no agent is running (nothing listens on {socket_path}); start one "
                                  "with `panal agent run` or `panal agent service start`") from exc
        except PermissionError as exc:
            raise ControlError(f"permission denied on {socket_path}: the agent runs as another user "
                               "(the system service runs as 'panal': try sudo -u panal)") from exc
        except OSError as exc:
            raise ControlError(f"cannot reach the agent at {socket_path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(payload)
            answer = _read_line(sock)
        except TimeoutError as exc:
            raise ControlError(f"the agent at {socket_path} did not answer within {timeout_s:g} s") from exc
        except OSError as exc:
            raise ControlError(f"lost the connection to the agent at {socket_path}: {exc}") from exc
    try:
        reply = json.loads(answer)
    except ValueError as exc:
        raise ControlError(f"the agent at {socket_path} sent a malformed answer") from exc
    if not isinstance(reply, dict):
        raise ControlError(f"the agent at {socket_path} sent a malformed answer")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error") or "the agent refused the request"))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or size > 16 * MAX_REQUEST_BYTES:
            break
    data = b"".join(chunks)
    if not data:
        raise ConnectionError("the agent closed the connection without answering")
    return data.split(b"\n", 1)[0]
