"""``panal hub ...``: create, serve and administer a board."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from agent.cli.common import PanalGroup, home, print_json, read_public_key, run, until_signalled
from hub.home import HubHome
from hub.server import BoardServer
from hub.store import Store
from hub.stores import create_store
from security.errors import BadRequest, NotFound
from security.identity import PublicKey
from security.tls import server_context

log = logging.getLogger(__name__)
dir_option = click.option("--dir", "root", type=click.Path(path_type=Path), default=Path("hubdata"),
                          show_default=True, help="The hub's directory (config, keys, database).")


@click.group(cls=PanalGroup)
def hub() -> None:
    """Run a hub (a board that agents on other machines join over signed TLS)."""


@hub.command()
@dir_option
@click.option("--host", default=None, help="Address agents will use to reach the hub.  [default: 127.0.0.1]")
@click.option("--port", default=None, type=click.IntRange(0, 65535),
              help="The port agents connect to.  [default: 8747]")
@click.option("--insecure/--tls", "insecure", default=None,
              help="Plain HTTP (only sensible on loopback), or TLS (the default).")
def init(root: Path, host: str | None, port: int | None, insecure: bool | None) -> None:
    """Create the hub's identity and self-signed TLS certificate; print the join URL.

    On an existing hub, set the --host, --port and --insecure/--tls given in hub.yaml, keeping its
    keys and certificate (the join URL changes with the host and port, its fingerprint does not)."""
    hub_home = HubHome(root)
    existed = hub_home.initialised
    tls = None if insecure is None else not insecure
    changes = hub_home.configure(host=host, port=port, tls=tls) if hub_home.config_path.exists() else {}
    config = hub_home.init(host, port, tls)
    me = home().user_identity()
    run(_add_submitter(_store(hub_home), me.public, "owner"))
    if not existed:
        click.echo(f"hub initialised in {root}")
    elif changes:
        changed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        click.echo(f"updated {hub_home.config_path}: {changed} (keys and certificate kept)")
        if hub_home.serve_path.exists():
            click.echo("the running hub keeps its old settings until `panal hub serve` is restarted")
        if {"host", "port", "tls"} & changes.keys():
            click.echo("agents that joined the old URL must join the new one")
    else:
        click.echo(f"hub in {root} already initialised: settings, keys and certificate unchanged")
    click.echo(f"your key {me.id} may submit jobs (more: `panal hub submitters add KEY`)")
    click.echo("join URL (give it to volunteers: `panal agent join URL`):")
    click.echo(hub_home.address(config).join_url())


def _store(hub_home: HubHome) -> Store:
    """The hub's store as its settings name it (not opened)."""
    config = hub_home.config()
    return create_store(config.store, hub_home.db_path, synchronous=config.sqlite_synchronous)


async def _add_submitter(store: Store, key: PublicKey, name: str) -> None:
    await store.open()
    try:
        await store.add_submitter(key.id, key.text(), name)
    finally:
        await store.close()


@hub.command()
@dir_option
@click.option("--port", type=int, default=None, help="Override the configured port (0: any free port).")
@click.option("--bind", default=None, help="Override the bind address.")
def serve(root: Path, port: int | None, bind: str | None) -> None:
    """Serve the board until SIGTERM/SIGINT (then drain: finish or requeue running leases)."""
    hub_home = HubHome(root)
    if not hub_home.initialised:
        raise NotFound(f"{root} is not a hub directory: run `panal hub init --dir {root}` first")
    config = hub_home.config(port=port, bind=bind)
    if not config.tls and not config.insecure and config.bind not in ("127.0.0.1", "::1", "localhost"):
        raise BadRequest("refusing plain HTTP on a non-loopback address: enable tls or set insecure: true")
    if config.tls and not hub_home.cert_path.exists():
        raise NotFound(f"{hub_home.cert_path} is missing: run `panal hub init --dir {root}`")
    ssl_context = server_context(hub_home.cert_path, hub_home.tls_key_path) if config.tls else None

    async def main(stop: asyncio.Event) -> None:
        server = BoardServer(config, hub_home.db_path, ssl_context)
        bound = await server.start()
        url = hub_home.address(config, bound).join_url()
        hub_home.serve_path.write_text(url + "\n")
        click.echo(f"panal hub serving at {url}", err=False)
        sys.stdout.flush()
        await stop.wait()
        log.info("shutting down: draining leases for up to %.0f s", config.drain_timeout_s)
        await server.stop(drain=True)
        hub_home.serve_path.unlink(missing_ok=True)

    run(until_signalled(main))


@hub.group(cls=PanalGroup)
def submitters() -> None:
    """Who may submit jobs to this hub."""


@submitters.command("add")
@dir_option
@click.argument("key")
@click.option("--name", default="", help="A name to recognise the key by.")
def submitters_add(root: Path, key: str, name: str) -> None:
    """Authorise a submitter key (text `ed25519:...` or a file containing it)."""
    public = read_public_key(key)
    run(_add_submitter(_store(HubHome(root)), public, name or public.id[:12]))
    click.echo(f"authorised {public.id}")


@submitters.command("list")
@dir_option
@click.option("--json", "as_json", is_flag=True)
def submitters_list(root: Path, as_json: bool) -> None:
    """List authorised submitter keys."""
    store = _store(HubHome(root))

    async def go() -> list[tuple[str, str, str]]:
        await store.open()
        try:
            return await store.list_submitters()
        finally:
            await store.close()

    rows = run(go())
    if as_json:
        print_json([{"id": i, "key": k, "name": n} for i, k, n in rows])
        return
    for key_id, _, name in rows:
        click.echo(f"{key_id}  {name}")


@submitters.command("remove")
@dir_option
@click.argument("key_id")
def submitters_remove(root: Path, key_id: str) -> None:
    """Revoke a submitter key by id."""
    store = _store(HubHome(root))

    async def go() -> bool:
        await store.open()
        try:
            return await store.remove_submitter(key_id)
        finally:
            await store.close()

    if not run(go()):
        raise NotFound(f"no submitter {key_id}")
    click.echo(f"revoked {key_id}")


@hub.command("url")
@dir_option
def hub_url(root: Path) -> None:
    """Print the join URL of the hub in DIR (the running one's, if it runs)."""
    hub_home = HubHome(root)
    if hub_home.serve_path.exists():
        click.echo(hub_home.serve_path.read_text().strip())
    else:
        click.echo(hub_home.address(hub_home.config()).join_url())


__all__ = ["hub"]
