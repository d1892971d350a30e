"""``panal agent service install|uninstall|status|start|stop|logs``: the agent as a background service.

Thin click layer over :mod:`agent.host.service`: pick the platform and scope, build the plan, then
print it (``--dry-run``) or carry it out. Errors are one clear line, never a traceback.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from agent.host.home import AgentHome
from agent.host.service import Action, InstallChoices, ServicePlan, execute, installed_scope, linger_enabled, plan
from agent.host.service_target import SERVICE_USER, Platform, Scope, ServiceTarget
from security.errors import PanalError

__all__ = ["service"]


def _scope_option(default_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--user/--system", "user_scope", default=None,
                        help=f"A per-user service, or a system-wide one run by a dedicated 'panal' user "
                             f"(needs root). {default_help}")


def _target(user_scope: bool | None, *, for_install: bool) -> ServiceTarget:
    if user_scope is None:
        scope = Scope.USER if for_install else (installed_scope() or Scope.USER)
    else:
        scope = Scope.USER if user_scope else Scope.SYSTEM
    try:
        return ServiceTarget.detect(scope)
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _show(service_plan: ServicePlan) -> None:
    """Plain text, no wrapping or truncation: the volunteer may copy the unit file from it."""
    click.echo(service_plan.describe())


def _carry_out(target: ServiceTarget, action: Action, dry_run: bool, *, follow: bool = False,
               lines: int = 200, choices: InstallChoices | None = None) -> None:
    try:
        service_plan = plan(target, action, follow=follow, lines=lines, choices=choices)
        if dry_run:
            _show(service_plan)
            return
        needs_root = target.scope is Scope.SYSTEM and action in (
            Action.INSTALL, Action.UNINSTALL, Action.START, Action.STOP)
        if needs_root and not _is_root():
            raise click.ClickException(f"`{action}` of the system service needs root: run it with sudo "
                                       "(or use --user)")
        status = execute(service_plan, echo=click.echo)
    except PanalError as exc:
        raise click.ClickException(exc.message) from exc
    if action is Action.STATUS and status not in (0, 3):  # systemctl: 3 = not running
        sys.exit(status)


@click.group("service")
def service() -> None:
    """Run the agent in the background: at boot (systemd), at login (launchd, Task Scheduler)."""


def _linger(target: ServiceTarget, flag: bool | None) -> InstallChoices:
    """Lingering (a user service that starts at boot, without a login) only when asked: the flag,
    else a question on a terminal, else no."""
    if target.platform is not Platform.SYSTEMD or target.scope is not Scope.USER:
        return InstallChoices()
    user = getpass.getuser()
    already = linger_enabled(user)
    if flag is None:
        flag = already or (sys.stdin.isatty() and click.confirm(
            "Start the agent at boot, without you logging in? (runs `loginctl enable-linger`)", default=False))
    return InstallChoices(linger=flag, linger_already=already)


def _warn_without_board(target: ServiceTarget) -> None:
    """A service that joined no board only finds work from LAN peers: say so at install."""
    try:
        joined = AgentHome(target.panal_home).boards()
    except (PanalError, OSError):
        return   # unreadable (the system service's home, without root): nothing to say
    if joined:
        return
    join = "panal agent join JOIN_URL"
    if target.scope is Scope.SYSTEM:
        join = (f"sudo -u {SERVICE_USER} env PANAL_HOME={target.panal_home} {target.python} "
                "-m panal_launch agent join JOIN_URL")
    click.echo(f"warning: this agent has joined no board, so it gets work only from LAN peers (if LAN "
               f"mode is on); join one with `{join}`", err=True)


@service.command()
@_scope_option("Default: --user.")
@click.option("--linger/--no-linger", default=None,
              help="User service: start it at boot without a login (`loginctl enable-linger`). "
                   "Default: ask on a terminal, else no.")
@click.option("--dry-run", is_flag=True, help="Print what would be written and run; change nothing.")
def install(user_scope: bool | None, linger: bool | None, dry_run: bool) -> None:
    """Install and start the service, using this Python interpreter and PANAL_HOME."""
    target = _target(user_scope, for_install=True)
    _warn_without_board(target)
    _carry_out(target, Action.INSTALL, dry_run, choices=_linger(target, False if dry_run and linger is None
                                                                else linger))
    if not dry_run:
        click.echo(f"installed: {target.service_file} runs {target.python} -m panal_launch agent run")
        click.echo("see what it does with `panal agent status`; remove it with `panal agent service uninstall`")


@service.command()
@_scope_option("Default: whichever is installed.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed and run; change nothing.")
def uninstall(user_scope: bool | None, dry_run: bool) -> None:
    """Stop and remove the service and what its install turned on (lingering); the agent's keys and data stay."""
    _carry_out(_target(user_scope, for_install=False), Action.UNINSTALL, dry_run)


@service.command()
@_scope_option("Default: whichever is installed.")
def status(user_scope: bool | None) -> None:
    """What the service manager says about the agent (use `panal agent status` for its work)."""
    _carry_out(_target(user_scope, for_install=False), Action.STATUS, False)


@service.command()
@_scope_option("Default: whichever is installed.")
def start(user_scope: bool | None) -> None:
    """Start the installed service."""
    _carry_out(_target(user_scope, for_install=False), Action.START, False)


@service.command()
@_scope_option("Default: whichever is installed.")
def stop(user_scope: bool | None) -> None:
    """Stop the service until the next start, boot or login."""
    _carry_out(_target(user_scope, for_install=False), Action.STOP, False)


@service.command()
@_scope_option("Default: whichever is installed.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=200, show_default=True, type=click.IntRange(1, 100_000))
def logs(user_scope: bool | None, follow: bool, lines: int) -> None:
    """The agent's log: the journal on Linux, its log file on macOS and Windows."""
    _carry_out(_target(user_scope, for_install=False), Action.LOGS, False, follow=follow, lines=lines)
