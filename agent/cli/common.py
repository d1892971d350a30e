"""What every ``panal`` command module shares: the error-catching group, output helpers, the home.

Command modules import this and never :mod:`agent.cli`, which only assembles them: so each one
imports on its own, without a circle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import click
from rich.console import Console
from rich.markup import escape

from agent import eventloop
from agent.client.board import BoardClient
from agent.host.home import AgentHome
from security.errors import BadRequest, PanalError
from security.identity import PublicKey
from security.tls import BoardAddress

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_TIMEOUT",
    "PanalGroup",
    "console",
    "fail",
    "home",
    "plain",
    "print_json",
    "read_public_key",
    "run",
    "setup_logging",
    "until_signalled",
    "with_client",
]

T = TypeVar("T")
console = Console()
EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT = 2, 3, 4


class PanalGroup(click.Group):
    """Turns every expected error into one clear line on stderr and a non-zero exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PanalError as exc:
            fail(exc.message)
        except aiohttp.ClientError as exc:
            fail(f"network error: {exc}")
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


def fail(message: str, status: int = 1) -> NoReturn:
    """One clear message, never wrapped: lines like ``file:line:col: path: msg`` stay greppable."""
    if "\n" in message:  # a list of problems (e.g. a manifest's), one per line
        click.echo(message, err=True)
    else:
        click.echo(click.style("error:", fg="red") + " " + message, err=True)
    sys.exit(status)


def plain(value: Any) -> str:
    """``value`` as text rich prints verbatim: an error like ``[enforce fail at alloc_cpu.cpp:127]``
    from a board or a peer is not markup to drop (or a style to apply)."""
    return escape(str(value))


def read_public_key(text: str) -> PublicKey:
    """A key given on the command line: an existing file holding it, or the key text itself
    (``ed25519:`` optional; base64 has ``/`` in it, so a slash alone does not make a path)."""
    path = Path(text).expanduser()
    if _is_file(path):
        try:
            content = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadRequest(f"cannot read key file {path}: {exc}") from exc
        try:
            return PublicKey.parse(content)
        except BadRequest:
            raise BadRequest(f"{path} does not hold an Ed25519 public key (expected one line "
                             "ed25519:<base64>, as `panal keys show` prints)") from None
    try:
        return PublicKey.parse(text)
    except BadRequest:
        expected = "expected ed25519:<base64>, as `panal keys show` prints"
        if any(c in text for c in "/.~\\"):  # perhaps meant as a path
            raise BadRequest(f"no key file {path}, and {text[:60]!r} is not an Ed25519 public key either "
                             f"({expected})") from None
        raise BadRequest(f"{text[:60]!r} is not an Ed25519 public key ({expected})") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for a path (or with a NUL) is key text
        return False


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on the event loop ``PANAL_EVENT_LOOP`` names (agent/eventloop.py)."""
    return eventloop.run(coro)


def home() -> AgentHome:
    return AgentHome()


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


async def with_client(address: BoardAddress, fn: Callable[[BoardClient], Awaitable[T]],
                      insecure: bool = False, as_agent: bool = False) -> T:
    h = home()
    identity = h.agent_identity() if as_agent else h.user_identity()
    async with BoardClient(address, identity, insecure=insecure, retry_for_s=10.0) as client:
        return await fn(client)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until SIGTERM/SIGINT sets ``stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await main(stop)
