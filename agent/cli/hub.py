"""``panal hub ...``: create, serve and administer a board."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.cli.common import PanalGroup, home, print_json, read_public_key, run, until_signalled
from hub.ha import database_status, is_shared, make_election, with_peers
from hub.home import HubHome
from hub.server import BoardServer
from hub.store import Store
from hub.stores import create_store, migrate_store
from hub.tokens import AdmissionToken, new_token
from jobs.manifest import parse_duration
from security.errors import BadRequest, NotFound
from security.identity import PublicKey
from security.tls import BoardAddress, server_context

log = logging.getLogger(__name__)
T = TypeVar("T")
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
    if config.registration_mode == "token":
        click.echo("registration needs an admission token here: `panal hub tokens create` prints a join URL "
                   "with one (give it to volunteers: `panal agent join URL`)")
        click.echo("hub URL (no token):")
    else:
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

    election = make_election(config)
    lost = False

    async def main(stop: asyncio.Event) -> None:
        nonlocal lost
        server = BoardServer(config, hub_home.db_path, ssl_context, election=election)
        bound = await server.start()
        log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.partition(".")[0])
        url = with_peers(hub_home.address(config, bound), config).join_url()
        hub_home.serve_path.write_text(url + "\n")
        click.echo(f"panal hub serving at {url}" + (" (a standby until it is the active hub)" if election else ""),
                   err=False)
        sys.stdout.flush()
        if election is not None:
            lost = await _serve_candidate(server, url, stop)
        else:
            await stop.wait()
        log.info("shutting down: draining leases for up to %.0f s", config.drain_timeout_s)
        await server.stop(drain=not lost)
        hub_home.serve_path.unlink(missing_ok=True)

    run(until_signalled(main))
    if lost:   # its supervisor restarts it: a standby again, with the state the database holds
        raise SystemExit(75)


async def _serve_candidate(server: BoardServer, url: str, stop: asyncio.Event) -> bool:
    """Serve as one of several hubs until stopped; True if this hub lost its place as the active one."""
    assert server.election is not None
    activating: asyncio.Task[None] = asyncio.create_task(server.activate(url))
    lost = asyncio.create_task(server.election.lost.wait())
    stopping = asyncio.create_task(stop.wait())
    waiting: set[asyncio.Task[Any]] = {lost, stopping, activating}
    while not (lost.done() or stopping.done()):
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if activating.done() and activating in waiting:
            waiting.discard(activating)
            if not activating.cancelled() and activating.exception() is not None:
                # it won the lock but could not load the board: give the lock up rather than hold it idle
                log.error("could not take over: %s", activating.exception())
                server.election.lost.set()
    for task in (activating, lost, stopping):
        task.cancel()
    await asyncio.gather(activating, lost, stopping, return_exceptions=True)
    if server.election.lost.is_set() and not stop.is_set():
        click.echo("panal hub: this hub is no longer the active one; it stops (exit 75) so that it is "
                   "restarted as a standby", err=True)
        return True
    return False


@hub.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def hub_status(root: Path, as_json: bool) -> None:
    """Which hub of this board is active, since when, and how its database answers."""
    config = HubHome(root).config()
    if not is_shared(config):
        status: dict[str, object] = {"store": "sqlite", "active": "this hub (a SQLite store has one hub)"}
    else:
        status = run(database_status(config.store))
    if as_json:
        print_json(status)
        return
    for line in _status_lines(status):
        click.echo(line)
    if status.get("database") == "unreachable":
        raise SystemExit(1)


def _status_lines(status: dict[str, object]) -> list[str]:
    if status.get("store") == "sqlite":
        return ["store: SQLite (one hub; active/standby needs store: postgresql://...)"]
    if status["database"] == "unreachable":
        return [f"database: UNREACHABLE ({status['error']})"]
    lines = [f"database: reachable (connect {status['connect_ms']} ms, round trip {status['round_trip_ms']} ms"
             + (", a read-only replica!" if status["read_only_replica"] else "") + ")"]
    active = status.get("active")
    if not isinstance(active, dict):
        return [*lines, "active hub: none has taken over yet"]
    held = "holds the lock" if status["lock_held"] else "NO hub holds the lock (a standby takes over soon)"
    lines += [f"active hub: {active['hub']} ({held})", f"  url: {active['url']}",
              f"  since: {_when(active['since'])} (fencing token {active['token']})",
              f"  watchdog: last written {active['watchdog_age_s']} s ago"]
    return lines


@hub.command()
@dir_option
def migrate(root: Path) -> None:
    """Bring the store's schema up to date now and say what was done (hubs also do it when they start)."""
    hub_home = HubHome(root)
    if not hub_home.initialised:
        raise NotFound(f"{root} is not a hub directory: run `panal hub init --dir {root}` first")
    for line in run(migrate_store(hub_home.config().store, hub_home.db_path)):
        click.echo(line)


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


async def _with_store(store: Store, use: Callable[[Store], Awaitable[T]]) -> T:
    await store.open()
    try:
        return await use(store)
    finally:
        await store.close()


@hub.group(cls=PanalGroup)
def tokens() -> None:
    """Admission tokens: which new agents may register (registration: token, a hub's default)."""


@tokens.command("create")
@dir_option
@click.option("--uses", type=click.IntRange(0, None), default=1, show_default=True,
              help="How many new agents it admits (0: any number until it expires).")
@click.option("--expires", "expires", default="24h", show_default=True,
              help="How long it admits: e.g. 90m, 24h, 7d.")
@click.option("--label", default="", help="A note to recognise it by in `panal hub tokens list`.")
@click.option("--owner", default="", help="Whose machines it admits (e.g. one volunteer): instances of one task never "
                                         "run on two machines of one owner, so they cannot vouch for each other.")
def tokens_create(root: Path, uses: int, expires: str, label: str, owner: str) -> None:
    """Make an admission token and print the join URL that carries it (shown once: only its hash is kept)."""
    hub_home = HubHome(root)
    if not hub_home.initialised:
        raise NotFound(f"{root} is not a hub directory: run `panal hub init --dir {root}` first")
    ttl_s = parse_duration(expires)
    if ttl_s <= 0:
        raise BadRequest(f"--expires must be longer than zero, got {expires!r}")
    row, text = new_token(label, uses, time.time(), ttl_s, owner=owner.strip()[:64])
    run(_with_store(_store(hub_home), lambda store: store.add_admission_token(row)))
    config = hub_home.config()
    if hub_home.serve_path.exists():
        address = BoardAddress.parse(hub_home.serve_path.read_text())
    else:
        address = with_peers(hub_home.address(config), config)
    if config.registration_mode != "token":
        click.echo(f"note: registration on this hub is {config.registration_mode}: the token is not needed",
                   err=True)
    admits = "any number of agents" if uses == 0 else f"{uses} agent{'s' if uses != 1 else ''}"
    click.echo(f"token {row.id} admits {admits} until {_when(row.expires_at)}; join URL:")
    click.echo(address.join_url(token=text))


@tokens.command("list")
@dir_option
@click.option("--json", "as_json", is_flag=True)
def tokens_list(root: Path, as_json: bool) -> None:
    """List admission tokens (their ids and state; the secrets are not kept)."""
    rows: list[AdmissionToken] = run(_with_store(_store(HubHome(root)), lambda store: store.list_admission_tokens()))
    now = time.time()
    if as_json:
        print_json([{"id": t.id, "label": t.label, "owner": t.owner, "uses": t.uses, "max_uses": t.max_uses,
                     "created_at": t.created_at, "expires_at": t.expires_at, "revoked_at": t.revoked_at,
                     "state": t.refusal(now) or "active"} for t in rows])
        return
    for t in rows:
        limit = "unlimited" if t.max_uses == 0 else str(t.max_uses)
        click.echo(f"{t.id}  {t.refusal(now) or 'active':8}  used {t.uses}/{limit}  expires {_when(t.expires_at)}"
                   f"  {'owner ' + t.owner + '  ' if t.owner else ''}{t.label}")


@tokens.command("revoke")
@dir_option
@click.argument("token_id")
def tokens_revoke(root: Path, token_id: str) -> None:
    """Revoke an admission token by id (agents it already admitted stay; the running hub sees it at once)."""
    token_id = token_id.split(".", 1)[0]   # the whole token text works too
    if not run(_with_store(_store(HubHome(root)), lambda store: store.revoke_admission_token(token_id, time.time()))):
        raise NotFound(f"no active admission token {token_id}")
    click.echo(f"revoked admission token {token_id}")


def _when(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@hub.command("url")
@dir_option
def hub_url(root: Path) -> None:
    """Print the join URL of the hub in DIR (the running one's, if it runs)."""
    hub_home = HubHome(root)
    if hub_home.serve_path.exists():
        click.echo(hub_home.serve_path.read_text().strip())
    else:
        config = hub_home.config()
        click.echo(with_peers(hub_home.address(config), config).join_url())


__all__ = ["hub"]


@hub.command("sim")
@click.option("--fleet", "fleet_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A fleet file (hosts and workload; see configs/sim/). Default: the built-in mixed fleet.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Multiply the fleet file's host and job counts (0.05: a twentieth, same shape).")
@click.option("--policy", "policies", multiple=True, help="Policies to compare (default: all).")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sim(fleet_file: Path | None, scale: float, policies: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Simulate the dispatch policies on a fleet (the real board and store, virtual time): makespan,
    deadline misses, Jain fairness, and how long each pick took."""
    from agent.tools.sim_figures import format_table
    from agent.tools.sim_fleets import FleetFileError, load_scenario
    from agent.tools.sim_scenario import BUILTIN, describe
    from agent.tools.simulate import run_simulation
    from hub.dispatch import POLICIES

    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise BadRequest(f"unknown dispatch policy {', '.join(unknown)} (known: {', '.join(sorted(POLICIES))})")
    try:
        scenario = load_scenario(fleet_file, scale) if fleet_file is not None else BUILTIN
    except FleetFileError as exc:
        raise BadRequest(f"fleet file: {exc}") from None
    rows = run_simulation(list(policies) or list(POLICIES), seed, scenario)
    if as_json:
        print_json(rows)
        return
    click.echo(f"{scenario.name}: {sum(h.count for h in scenario.hosts)} agents; seed {seed}")
    click.echo(format_table(rows))
    click.echo(f"\nfleet: {describe(scenario)}")
