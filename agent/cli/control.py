"""``panal agent pause [--for 2h]``, ``resume`` and ``status``: the volunteer's hand on the agent.

They talk to the running agent through its control socket (:mod:`agent.volunteer.control`), so they work
the same for an agent in a terminal and one run by the service manager.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent.cli.common import plain
from agent.volunteer.control import control_request, default_socket_path
from security.errors import PanalError

__all__ = ["COMMANDS", "parse_duration", "pause_command", "render_status", "resume_command", "status_command"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")

socket_option = click.option(
    "--socket", "socket_path", type=click.Path(path_type=Path), default=None,
    help="The agent's control socket (default: $PANAL_HOME/agent.sock or the user runtime dir).")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1d', '1h30m' or plain seconds -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    try:
        seconds = float(cleaned)
    except ValueError:
        parts = _DURATION_RE.findall(cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 2h or 1h30m") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not 0 < seconds < float("inf"):
        raise click.BadParameter(f"{text!r}: a pause must last longer than zero")
    return seconds


def _request(socket_path: Path | None, op: str, **args: Any) -> dict[str, Any]:
    try:
        return control_request(socket_path or default_socket_path(), op, **args)
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc


def _progress(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value * 100:.0f}%" if value <= 1 else f"{value:g}"
    return "" if value is None else str(value)


_HEALTH = {"closed": "ok", "half_open": "recovering", "open": "unreachable"}


def render_status(status: dict[str, Any]) -> None:
    """Print the agent's status for a person: state and why, today's compute, totals and credit,
    current tasks with progress, boards with their health, and the commands to pause, stop and
    uninstall. Fields without a layout (LAN mode's, newer agents') are listed as key: value, so new
    fields show up without a CLI change."""
    console = Console()
    shown = {"state", "paused", "reason", "why", "paused_until", "tasks", "boards", "name", "agent_id", "slots",
             "free_slots", "workers", "compute_today_h", "done", "failed", "credit", "commands", "disabled_kinds",
             "peers", "lan", "gpu_paused"}
    state = status.get("state") or ("paused" if status.get("paused") else "running")
    colour = "yellow" if status.get("paused") or state == "paused" else "green"
    why = status.get("why") or status.get("reason")
    console.print(f"state: [{colour}]{plain(state)}[/{colour}]" + (f" ({plain(str(why))})" if why else ""))
    if status.get("paused_until"):
        console.print(f"paused until: {status['paused_until']}", highlight=False, markup=False)
    if status.get("name") or status.get("agent_id"):
        console.print(f"agent: {status.get('name', '')} ({status.get('agent_id', '')})", highlight=False, markup=False)
    if "slots" in status:
        console.print(f"free slots: {status.get('free_slots', '?')} of {status['slots']}"
                      + (f"; worker processes: {status['workers']}" if "workers" in status else ""),
                      highlight=False, markup=False)
    if "compute_today_h" in status:
        console.print(f"compute today: {status['compute_today_h']} h", highlight=False, markup=False)
    if "done" in status or "failed" in status:
        console.print(f"tasks since start: {status.get('done', 0)} done, {status.get('failed', 0)} failed",
                      highlight=False, markup=False)
    if "credit" in status:
        console.print(f"credit earned: {status['credit']} (as the boards count it)", highlight=False, markup=False)
    if status.get("disabled_kinds"):
        console.print(f"kinds switched off after failures: {status['disabled_kinds']}", highlight=False,
                      markup=False)
    tasks = status.get("tasks") or []
    if tasks:
        table = Table("task", "kind", "progress", "board", title="current tasks")
        for t in tasks:
            table.add_row(plain(t.get("id", "")), plain(t.get("kind", "")), _progress(t.get("progress")),
                          plain(t.get("board", "")))
        console.print(table)
    else:
        console.print("no tasks running")
    boards = status.get("boards") or []
    if boards:
        table = Table("board", "health", "done", "failed", "credit", "invalid results", "refused", title="boards")
        for b in boards:
            standing = b.get("standing") or {}
            health = _HEALTH.get(str(b.get("breaker", "")), str(b.get("breaker", "")))
            if not b.get("registered", True):
                health += " (not registered yet)"
            table.add_row(plain(b.get("url", "")), plain(health), plain(str(b.get("done", "-"))),
                          plain(str(b.get("failed", "-"))), plain(str(standing.get("credit", "-"))),
                          plain(str(standing.get("invalid_results", "-"))), plain(b.get("refused") or ""))
        console.print(table)
    gpu_paused = status.get("gpu_paused")
    if isinstance(gpu_paused, dict) and gpu_paused:
        for gpu, reason in gpu_paused.items():
            console.print(f"GPU {gpu} paused: {reason}", highlight=False, markup=False)
    _render_lan(console, status)
    for key, value in status.items():
        if key not in shown:
            console.print(f"{key}: {value}", highlight=False, markup=False)
    commands = status.get("commands") or {}
    if isinstance(commands, dict) and commands:
        console.print("commands:")
        for what, command in commands.items():
            console.print(f"  {what:<10} {command}", highlight=False, markup=False)


def _render_lan(console: Console, status: dict[str, Any]) -> None:
    """LAN mode: this agent's own board and the peers it found, as a line and a table (not raw maps)."""
    lan = status.get("lan")
    if isinstance(lan, dict):
        board = str(lan.get("board", "")).split("#", 1)[0]
        trusted = lan.get("trusted_submitters") or []
        whose = "open to any submitter" if lan.get("open") else f"{len(trusted)} trusted submitter(s)"
        console.print(f"LAN board: {board} ({whose})", highlight=False, markup=False)
    peers = status.get("peers")
    if isinstance(peers, list) and peers:
        table = Table("peer", "address", "state", "health", "offers work", title="LAN peers")
        for peer in peers:
            if not isinstance(peer, dict):
                continue
            address = ", ".join(str(a) for a in peer.get("addresses") or [])
            health = _HEALTH.get(str(peer.get("breaker", "")), str(peer.get("breaker", "")))
            table.add_row(plain(str(peer.get("id", ""))[:16]), plain(f"{address}:{peer.get('port', '')}"),
                          plain(str(peer.get("state", ""))), plain(health), "yes" if peer.get("work") else "no")
        console.print(table)


@click.command("pause")
@click.option("--for", "duration", default=None, metavar="DURATION",
              help="How long, e.g. 30m, 2h, 1h30m (default: until `panal agent resume`).")
@click.option("--reason", default="paused by the owner", show_default=True)
@socket_option
def pause_command(duration: str | None, reason: str, socket_path: Path | None) -> None:
    """Stop taking work and suspend running tasks until resumed (or for a while)."""
    for_s = parse_duration(duration) if duration is not None else None
    status = _request(socket_path, "pause", for_s=for_s, reason=reason)
    click.echo("paused" + (f" for {duration}" if duration else " until `panal agent resume`")
               + (f" ({status['reason']})" if status.get("reason") else ""))


@click.command("resume")
@socket_option
def resume_command(socket_path: Path | None) -> None:
    """Lift a manual pause (the volunteer's other rules still apply)."""
    status = _request(socket_path, "resume")
    if status.get("paused"):
        click.echo(f"resumed, but still paused: {status.get('reason') or 'by another rule'}")
    else:
        click.echo("resumed")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@socket_option
def status_command(as_json: bool, socket_path: Path | None) -> None:
    """Show what the agent is doing: state, pause reason, tasks with progress, boards."""
    status = _request(socket_path, "status")
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
    else:
        render_status(status)


COMMANDS = (pause_command, resume_command, status_command)
