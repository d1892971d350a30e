"""CLI commands for LAN clusters: ``panal trust add|list|remove`` and ``panal peers``.

The main CLI mounts them and provides, through ``ctx.obj``:
- ``"trust_path"``: the trust store file (e.g. ``home / "trust.yaml"``), or ``"home"`` and we use
  ``home / "trust.yaml"``;
- ``"peers"``: a callable returning the peers as dicts (:meth:`agent.lan.peers.Peer.to_dict`).
Errors are :class:`PanalError`; they become a one-line ``click`` error, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent.cli.common import plain, read_public_key
from security.errors import PanalError
from security.truststore import TrustStore

__all__ = ["peers_command", "register", "render_peers", "render_trust", "trust_group"]

PeersSource = Callable[[], list[dict[str, Any]]]


def _store(ctx: click.Context) -> TrustStore:
    obj = ctx.find_root().obj or {}
    path = obj.get("trust_path") or (Path(obj["home"]) / "trust.yaml" if "home" in obj else None)
    if path is None:
        raise click.UsageError("no trust store configured (ctx.obj lacks 'trust_path' or 'home')")
    return TrustStore(Path(path))


def _table_text(table: Table) -> str:
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False, color_system=None).print(table)
    return out.getvalue().rstrip("\n")


def render_trust(keys: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(keys, indent=2)
    if not keys:
        return "no trusted keys"
    table = Table("name", "id", "key", "added", "code")
    for k in keys:
        added = dt.datetime.fromtimestamp(k["added"]).strftime("%Y-%m-%d %H:%M") if k["added"] else ""
        table.add_row(*map(plain, (k["name"] or "", k["id"], k["key"], added, "yes" if k.get("code") else "no")))
    return _table_text(table)


def render_peers(peers: list[dict[str, Any]], as_json: bool) -> str:
    """``panal peers`` output: a table for people, JSON (the dicts as given) for scripts."""
    if as_json:
        return json.dumps(peers, indent=2)
    if not peers:
        return "no peers"
    table = Table("id", "address", "caps", "slots", "work", "last seen", "state", "breaker", "trusted")
    now = time.time()
    for p in peers:
        addresses = ", ".join(f"{a}:{p['port']}" for a in p.get("addresses", []))
        table.add_row(*map(plain, (  # ids, addresses and caps come from the peers' announcements
            p["id"], addresses, ",".join(p.get("caps", [])), p.get("slots", ""),
            "yes" if p.get("work") else "no", f"{max(0.0, now - p['last_seen']):.0f}s ago",
            p.get("state", ""), p.get("breaker", ""),
            "" if p.get("trusted") is None else "yes" if p["trusted"] else "no",
        )))
    return _table_text(table)


@click.group("trust")
def trust_group() -> None:
    """Submitter keys whose work this agent runs on the LAN."""


@trust_group.command("add")
@click.argument("key")
@click.option("--name", help="a short name to refer to the key by")
@click.option("--code", is_flag=True, help="also run this submitter's own code (the `python` kind), in the "
              "sandbox; off unless given")
@click.pass_context
def trust_add(ctx: click.Context, key: str, name: str | None, code: bool) -> None:
    """Trust KEY (ed25519:... text, or a file containing it)."""
    try:
        entry = _store(ctx).add(read_public_key(key), name=name, code=code)
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"trusted {entry.id}" + (f" ({entry.name})" if entry.name else "")
               + (": its code too (runs in the sandbox)" if entry.code else ""))


@trust_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def trust_list(ctx: click.Context, as_json: bool) -> None:
    """List trusted keys."""
    try:
        keys = [k.to_dict() for k in _store(ctx).list()]
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(render_trust(keys, as_json))


@trust_group.command("remove")
@click.argument("ref", metavar="ID|NAME")
@click.pass_context
def trust_remove(ctx: click.Context, ref: str) -> None:
    """Stop trusting a key, by id or name."""
    try:
        entry = _store(ctx).remove(ref)
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"removed {entry.id}" + (f" ({entry.name})" if entry.name else ""))


@click.command("peers")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def peers_command(ctx: click.Context, as_json: bool) -> None:
    """Peers discovered on the LAN."""
    source: PeersSource | None = (ctx.find_root().obj or {}).get("peers")
    if source is None:
        raise click.UsageError("peer discovery is not available (ctx.obj lacks 'peers')")
    try:
        peers = source()
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(render_peers(peers, as_json))


def register(cli: click.Group) -> None:
    """Mount ``trust`` and ``peers`` on the main CLI group."""
    cli.add_command(trust_group)
    cli.add_command(peers_command)
