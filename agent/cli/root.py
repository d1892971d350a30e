"""The root ``panal`` group: the top-level commands (validate, schema, keys, config), and the others mounted.

Friendly errors (never a traceback), ``--json`` on listings. What the command modules share lives in
:mod:`agent.cli.common`, which they import instead of this module.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from agent.cli.agent import agent, up
from agent.cli.common import PanalGroup, home, print_json, run, setup_logging, with_client
from agent.cli.hub import hub
from agent.cli.jobs import COMMANDS as JOB_COMMANDS
from agent.cli.lan import register as register_lan
from agent.cli.results import results_cmd
from agent.cli.runlocal import run_local_cmd
from agent.cli.tools import bench, demo
from agent.client.board import BoardClient
from hub.intake import over_limits
from jobs.manifest import manifest_schema
from jobs.manifest_files import load_manifests
from jobs.precheck import check_local_inputs
from security.errors import PanalError
from security.tls import BoardAddress

__all__ = ["main"]


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
    from agent.volunteer.control import control_request, default_socket_path

    status = control_request(default_socket_path(), "status")
    peers: list[dict[str, Any]] = status.get("peers", [])
    return peers


# -- manifests -------------------------------------------------------------------------------------
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--hub", "hub_url", is_flag=False, flag_value="", default=None, metavar="[URL]",
              help="Also check against a hub's limits (timeout, memory, tasks): that hub, or the configured "
                   "board with a bare --hub.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP to a non-loopback board.")
def validate(files: tuple[Path, ...], hub_url: str | None, insecure: bool) -> None:
    """Check manifests without submitting them (and against a hub's limits with --hub).

    Local input files get the checks an agent runs before loading them (headers and archive
    listings only: nothing is loaded or run), and a row shard's count is checked against the rows."""
    limits = _hub_limits(hub_url or None, insecure) if hub_url is not None else None
    problems = 0
    for path in files:
        try:
            manifests = load_manifests(path)
        except PanalError as exc:
            click.echo(exc.message, err=True)
            problems += 1
            continue
        for m in manifests:
            over = check_local_inputs(m) + (over_limits(m, limits) if limits is not None else [])
            for field, message in over:
                click.echo(f"{path}: {m.name}: {field}: {message}", err=True)
            problems += bool(over)
            if not over:
                click.echo(f"{path}: {m.name}: ok ({m.kind}, {m.n_tasks} task{'s' if m.n_tasks != 1 else ''}, "
                           f"memory cap {m.memory_cap_gb:g} GB{'' if m.max_memory_gb else ' (default)'})")
    if problems:
        sys.exit(1)


def _hub_limits(hub_url: str | None, insecure: bool) -> dict[str, Any]:
    """The hub's published limits (``GET /v1/limits``, public)."""
    async def go(client: BoardClient) -> dict[str, Any]:
        return dict(await client.call("GET", "/v1/limits"))
    return run(with_client(home().default_board(hub_url), go, insecure))


@main.command()
def schema() -> None:
    """Print the manifest JSON Schema (for editors: VS Code YAML, etc.)."""
    print_json(manifest_schema())


@main.group(cls=PanalGroup)
def keys() -> None:
    """Your submitter key."""


@keys.command("show")
def keys_show() -> None:
    """Print your public key (for a board admin: `panal hub submitters add KEY`; a LAN agent: `panal trust add KEY`)."""
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


main.add_command(hub)
main.add_command(agent)
main.add_command(up)
main.add_command(bench)
main.add_command(demo)
main.add_command(run_local_cmd)
for _command in JOB_COMMANDS:
    main.add_command(_command)
main.add_command(results_cmd)
register_lan(main)
