"""Install the agent as a background service: systemd (user or system), launchd, Task Scheduler.

Volunteers install once and forget, so the service must start at boot or logon, restart after a
crash, and keep GPU access. Where it lives is a :class:`~agent.host.service_target.ServiceTarget`;
its files are rendered by :mod:`agent.host.service_units`.

Everything is planned first as a :class:`ServicePlan` (files to write or remove, commands to run)
and executed second, so ``--dry-run`` shows exactly what would happen and tests can render every
platform's files on any platform without installing anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.host.service_target import (
    LAUNCHD_LABEL,
    SERVICE_USER,
    SYSTEM_HOME,
    SYSTEMD_UNIT,
    WINDOWS_TASK,
    Platform,
    Scope,
    ServiceError,
    ServiceTarget,
    agent_argv,
    detect_platform,
)
from agent.host.service_units import (
    DEVICE_GROUPS,
    installed_extras,
    missing_device_groups,
    render_launchd_plist,
    render_systemd_unit,
    render_windows_task,
)

__all__ = ["Action", "Command", "FileWrite", "InstallChoices", "ServicePlan", "execute", "installed_scope",
           "linger_enabled", "plan"]

LOG_LINES = 200


class Action(StrEnum):
    INSTALL = "install"
    UNINSTALL = "uninstall"
    STATUS = "status"
    START = "start"
    STOP = "stop"
    LOGS = "logs"


@dataclass(frozen=True)
class FileWrite:
    path: Path
    content: str
    mode: int = 0o644
    encoding: str = "utf-8"


@dataclass(frozen=True)
class Command:
    """One platform command. ``check=False``: a failure is reported but does not stop the plan
    (``systemctl status`` exits 3 for a stopped unit). ``interactive``: stream to the terminal."""

    argv: tuple[str, ...]
    check: bool = True
    interactive: bool = False

    def __str__(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class ServicePlan:
    """What an action would do, in order: make directories, write files, run commands, remove files."""

    action: Action
    mkdirs: tuple[Path, ...] = ()
    writes: tuple[FileWrite, ...] = ()
    commands: tuple[Command, ...] = ()
    removes: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    after: tuple[Command, ...] = ()   # run once the files are removed (systemd's daemon-reload)

    def describe(self) -> str:
        """Human-readable text of the plan, for ``--dry-run``."""
        lines: list[str] = []
        lines += [f"mkdir -p {p}" for p in self.mkdirs]
        for w in self.writes:
            lines.append(f"--- write {w.path} (mode {w.mode:04o}) ---")
            lines += w.content.splitlines()
            lines.append(f"--- end of {w.path.name} ---")
        lines += [f"run   {c}" for c in self.commands]
        lines += [f"rm    {p}" for p in self.removes]
        lines += [f"run   {c}" for c in self.after]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _systemctl(target: ServiceTarget, *args: str, check: bool = True, interactive: bool = False) -> Command:
    scope = ("--user",) if target.scope is Scope.USER else ()
    return Command(("systemctl", *scope, *args), check=check, interactive=interactive)


@dataclass(frozen=True)
class InstallChoices:
    """What the volunteer decided for an install (the CLI asks or reads flags; tests pass them)."""

    linger: bool = False            # start the user's manager at boot, so the agent runs without a login
    linger_already: bool = False    # lingering was on before: uninstall leaves it on
    groups: tuple[str, ...] | None = None   # the device groups present (None: look them up)


def _plan_systemd(target: ServiceTarget, action: Action, *, follow: bool, lines: int,
                  choices: InstallChoices) -> ServicePlan:
    unit = target.service_file
    system = target.scope is Scope.SYSTEM
    if action is Action.INSTALL:
        notes: list[str] = []
        commands: list[Command] = []
        installed: list[str] = []
        if system:
            commands.append(Command(("sh", "-c", f"getent passwd {SERVICE_USER} >/dev/null || useradd "
                                     f"--system --user-group --home-dir {SYSTEM_HOME} --no-create-home "
                                     f"--shell /usr/sbin/nologin {SERVICE_USER}")))
            commands.append(Command(("install", "-d", "-m", "0700", "-o", SERVICE_USER, "-g", SERVICE_USER,
                                     str(target.panal_home))))
            if str(target.python).startswith(("/home/", "/root/")):
                notes.append(f"{target.python} is under a home directory: the '{SERVICE_USER}' user must be "
                             "able to read it; a system-wide venv such as /opt/panal is safer")
            groups = list(choices.groups) if choices.groups is not None else None
            missing = [g for g in DEVICE_GROUPS if g not in groups] if groups is not None else missing_device_groups()
            if "render" in missing:
                notes.append(f"this machine has no 'render' group, so the '{SERVICE_USER}' user cannot be given "
                             "access to AMD and Intel GPUs (/dev/dri/renderD*, /dev/kfd, owned by that group on "
                             "most distros); NVIDIA GPUs (/dev/nvidia*) are not affected. If a GPU should be lent, "
                             "create the group (`groupadd --system render`), let udev give it the render nodes, "
                             "and install again; or install with --user, which uses your own access")
            notes.append(f"join a hub as the service user: sudo -u {SERVICE_USER} env PANAL_HOME="
                         f"{target.panal_home} {shlex.join(str(a) for a in agent_argv(target.python)[:3])}"
                         " agent join URL")
        elif choices.linger:
            # Lingering starts the user's manager at boot, so the agent runs without a login.
            if not choices.linger_already:
                commands.append(Command(("loginctl", "enable-linger")))
                installed.append("enable-linger")
        else:
            notes.append("the agent runs while you are logged in; to start it at boot without a login, "
                         "install with --linger (it runs `loginctl enable-linger`)")
        commands += [_systemctl(target, "daemon-reload"),
                     _systemctl(target, "enable", "--now", SYSTEMD_UNIT)]
        return ServicePlan(action, mkdirs=(unit.parent,) + (() if system else (target.panal_home,)),
                           writes=(FileWrite(unit, render_systemd_unit(target, groups=choices.groups,
                                                                      installed=installed)),),
                           commands=tuple(commands), notes=tuple(notes))
    if action is Action.UNINSTALL:
        try:
            extras = installed_extras(unit.read_text(encoding="utf-8"))
        except OSError:
            extras = []
        commands = [_systemctl(target, "disable", "--now", SYSTEMD_UNIT, check=False)]
        if "enable-linger" in extras:   # only what this install turned on
            commands.append(Command(("loginctl", "disable-linger"), check=False))
        notes = [f"the agent's data (its key, joined boards, preferences) in {target.panal_home} is kept: "
                 f"remove that directory too to forget this agent"]
        if system:
            notes.append(f"the '{SERVICE_USER}' user is kept (it may own files elsewhere): "
                         f"`userdel {SERVICE_USER}` removes it")
        return ServicePlan(action, commands=tuple(commands), removes=(unit,), notes=tuple(notes),
                           after=(_systemctl(target, "daemon-reload", check=False),
                                  _systemctl(target, "reset-failed", SYSTEMD_UNIT, check=False)))
    if action is Action.LOGS:
        scope = ("--user",) if not system else ()
        argv = ("journalctl", *scope, "--unit", SYSTEMD_UNIT, "--lines", str(lines), "--no-pager",
                *(("--follow",) if follow else ()))
        return ServicePlan(action, commands=(Command(argv, check=False, interactive=True),))
    verb = {Action.STATUS: "status", Action.START: "start", Action.STOP: "stop"}[action]
    extra = ("--no-pager",) if action is Action.STATUS else ()
    return ServicePlan(action, commands=(_systemctl(target, verb, *extra, SYSTEMD_UNIT,
                                                    check=action is not Action.STATUS,
                                                    interactive=action is Action.STATUS),))


def _tail(path: Path, *, follow: bool, lines: int) -> Command:
    return Command(("tail", "-n", str(lines), *(("-f",) if follow else ()), str(path)),
                   check=False, interactive=True)


def _plan_launchd(target: ServiceTarget, action: Action, *, follow: bool, lines: int) -> ServicePlan:
    domain = f"gui/{target.uid}"
    service = f"{domain}/{LAUNCHD_LABEL}"
    plist = target.service_file
    if action is Action.INSTALL:
        return ServicePlan(action, mkdirs=(plist.parent, target.log_file.parent, target.panal_home),
                           writes=(FileWrite(plist, render_launchd_plist(target)),),
                           commands=(Command(("launchctl", "bootout", service), check=False),
                                     Command(("launchctl", "bootstrap", domain, str(plist)))))
    if action is Action.UNINSTALL:
        return ServicePlan(action, commands=(Command(("launchctl", "bootout", service), check=False),),
                           removes=(plist,))
    if action is Action.LOGS:
        return ServicePlan(action, commands=(_tail(target.log_file, follow=follow, lines=lines),))
    argv = {Action.STATUS: ("launchctl", "print", service),
            Action.START: ("launchctl", "kickstart", service),
            Action.STOP: ("launchctl", "kill", "SIGTERM", service)}[action]
    return ServicePlan(action, commands=(Command(argv, check=action is not Action.STATUS,
                                                 interactive=action is Action.STATUS),))


def _plan_schtasks(target: ServiceTarget, action: Action, *, follow: bool, lines: int) -> ServicePlan:
    xml = target.service_file
    if action is Action.INSTALL:
        return ServicePlan(
            action, mkdirs=(target.panal_home, target.log_file.parent),
            writes=(FileWrite(xml, render_windows_task(target), encoding="utf-16"),),
            commands=(Command(("schtasks", "/Create", "/TN", WINDOWS_TASK, "/XML", str(xml), "/F")),
                      Command(("schtasks", "/Run", "/TN", WINDOWS_TASK))),
            notes=(f"the task has no journal: the agent logs to {target.log_file}",))
    if action is Action.UNINSTALL:
        return ServicePlan(action, commands=(Command(("schtasks", "/End", "/TN", WINDOWS_TASK), check=False),
                                             Command(("schtasks", "/Delete", "/TN", WINDOWS_TASK, "/F"))),
                           removes=(xml,))
    if action is Action.LOGS:
        if follow:
            ps = f"Get-Content -Tail {lines} -Wait -LiteralPath '{target.log_file}'"
        else:
            ps = f"Get-Content -Tail {lines} -LiteralPath '{target.log_file}'"
        return ServicePlan(action, commands=(Command(("powershell", "-NoProfile", "-Command", ps),
                                                     check=False, interactive=True),))
    argv = {Action.STATUS: ("schtasks", "/Query", "/TN", WINDOWS_TASK, "/V", "/FO", "LIST"),
            Action.START: ("schtasks", "/Run", "/TN", WINDOWS_TASK),
            Action.STOP: ("schtasks", "/End", "/TN", WINDOWS_TASK)}[action]
    return ServicePlan(action, commands=(Command(argv, check=action is not Action.STATUS,
                                                 interactive=action is Action.STATUS),))


def plan(target: ServiceTarget, action: Action, *, follow: bool = False,
         lines: int = LOG_LINES, choices: InstallChoices | None = None) -> ServicePlan:
    """What ``action`` does for ``target``; nothing is touched (an uninstall reads the installed unit
    to learn what its install added)."""
    if target.platform is Platform.SYSTEMD:
        return _plan_systemd(target, action, follow=follow, lines=lines, choices=choices or InstallChoices())
    planner = {Platform.LAUNCHD: _plan_launchd, Platform.SCHTASKS: _plan_schtasks}[target.platform]
    return planner(target, action, follow=follow, lines=lines)


def installed_scope(user_home: Path | None = None) -> Scope | None:
    """Which systemd scope has the unit installed (system wins), or None: lets status/start/stop
    work without the volunteer remembering how they installed."""
    if detect_platform() is not Platform.SYSTEMD:
        return None
    for scope in (Scope.SYSTEM, Scope.USER):
        target = ServiceTarget(Platform.SYSTEMD, scope, Path(sys.executable), SYSTEM_HOME,
                               user_home=user_home or Path.home())
        if target.service_file.exists():
            return scope
    return None


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run_commands(commands: tuple[Command, ...], runner: Runner, echo: Callable[[str], None]) -> int:
    """Run ``commands`` in order; the exit status of the last interactive one, else 0."""
    status = 0
    for cmd in commands:
        try:
            if cmd.interactive:
                status = runner(list(cmd.argv), check=False).returncode
                continue
            done = runner(list(cmd.argv), check=False, capture_output=True, text=True)
        except FileNotFoundError as exc:
            if not cmd.check:
                continue
            raise ServiceError(f"`{cmd.argv[0]}` is not installed or not on PATH "
                               f"(needed for: {cmd})") from exc
        if done.returncode != 0 and cmd.check:
            detail = (done.stderr or done.stdout or "").strip()
            raise ServiceError(f"`{cmd}` failed with exit status {done.returncode}"
                               + (f": {detail}" if detail else ""))
        if done.returncode != 0:
            echo(f"warning: `{cmd}` exited with {done.returncode}; continuing")
    return status


def linger_enabled(user: str) -> bool:
    """Whether systemd already keeps ``user``'s manager running without a login."""
    return Path("/var/lib/systemd/linger", user).exists()


def execute(service_plan: ServicePlan, *, runner: Runner = subprocess.run,
            echo: Callable[[str], None] = print) -> int:
    """Carry out a plan. Returns the exit status of the last interactive command (status/logs),
    else 0. Raises :class:`ServiceError` with the command's own error text when one fails."""
    try:
        for d in service_plan.mkdirs:
            d.mkdir(parents=True, exist_ok=True)
        for w in service_plan.writes:
            tmp = w.path.with_name(w.path.name + ".tmp")
            tmp.write_text(w.content, encoding=w.encoding)
            tmp.chmod(w.mode)
            os.replace(tmp, w.path)
            echo(f"wrote {w.path}")
    except PermissionError as exc:
        raise ServiceError(f"permission denied writing {exc.filename}: a system service needs sudo") from exc
    except OSError as exc:
        raise ServiceError(f"cannot write {exc.filename}: {exc.strerror}") from exc
    status = _run_commands(service_plan.commands, runner, echo)
    for path in service_plan.removes:
        try:
            path.unlink(missing_ok=True)
            echo(f"removed {path}")
        except OSError as exc:
            raise ServiceError(f"cannot remove {path}: {exc.strerror}") from exc
    _run_commands(service_plan.after, runner, echo)
    for note in service_plan.notes:
        echo(f"note: {note}")
    return status
