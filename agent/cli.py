"""``panal``: the command line. Friendly errors (never a traceback), ``--json`` on listings."""

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
from rich.table import Table

from agent.client import BoardClient
from agent.home import AgentHome
from jobs.manifest import load_manifests, manifest_schema
from security.errors import PanalError
from security.tls import BoardAddress

__all__ = ["main"]

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


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


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


@click.group(cls=PanalGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="panal")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """panal: lend your GPUs and CPUs, or submit PyTorch work to machines that can run it."""
    setup_logging(verbose)
    ctx.obj = {"home": home().root, "peers": _peers}


def _peers() -> list[dict[str, Any]]:
    """Discovered LAN peers, as the running agent sees them (through its control socket)."""
    from agent.control import control_request, default_socket_path

    status = control_request(default_socket_path(), "status")
    peers: list[dict[str, Any]] = status.get("peers", [])
    return peers


# -- manifests -------------------------------------------------------------------------------------
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check manifests without submitting them."""
    problems = 0
    for path in files:
        try:
            manifests = load_manifests(path)
        except PanalError as exc:
            click.echo(exc.message, err=True)
            problems += 1
            continue
        for m in manifests:
            click.echo(f"{path}: {m.name}: ok ({m.kind}, {m.n_tasks} task{'s' if m.n_tasks != 1 else ''})")
    if problems:
        sys.exit(1)


@main.command()
def schema() -> None:
    """Print the manifest JSON Schema (for editors: VS Code YAML, etc.)."""
    print_json(manifest_schema())


@main.group(cls=PanalGroup)
def keys() -> None:
    """Your submitter key."""


@keys.command("show")
def keys_show() -> None:
    """Print your public key (give it to a board admin: `panal hub submitters add KEY`)."""
    identity = home().user_identity()
    click.echo(identity.public.text())


@keys.command("export")
@click.argument("file", type=click.Path(path_type=Path), required=False)
def keys_export(file: Path | None) -> None:
    """Write your public key to FILE (or stdout), to send to a board admin or a LAN trust store."""
    text = home().user_identity().public.text() + "\n"
    if file is None:
        click.echo(text, nl=False)
    else:
        file.write_text(text)
        click.echo(f"wrote {file}", err=True)


@main.group(cls=PanalGroup, name="config")
def config_group() -> None:
    """Client settings (which board `panal submit` talks to)."""


@config_group.command("set")
@click.argument("key", type=click.Choice(["hub"]))
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Set a client setting, e.g. `panal config set hub JOIN_URL`."""
    BoardAddress.parse(value)
    home().set_client(key, value)
    click.echo(f"{key} = {value}")


def _register_subcommands() -> None:
    from agent import cli_agent, cli_hub, cli_jobs

    main.add_command(cli_hub.hub)
    main.add_command(cli_agent.agent)
    main.add_command(cli_agent.up)
    main.add_command(cli_agent.bench)
    main.add_command(cli_agent.demo)
    for command in cli_jobs.COMMANDS:
        main.add_command(command)
    from agent import lan_cli

    lan_cli.register(main)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None)
    for col in ("ID", "NAME", "KIND", "STATE", "TASKS", "PRIORITY"):
        table.add_column(col)
    for job in jobs:
        counts = job.get("tasks", {})
        done = counts.get("done", 0)
        table.add_row(job["id"], job["name"], job["kind"], job["state"], f"{done}/{job['n_tasks']}",
                      str(job["priority"]))
    return table


_register_subcommands()
