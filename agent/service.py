"""Install the agent as a background service: systemd (user or system), launchd, Task Scheduler.

Volunteers install once and forget, so the service must start at boot or logon, restart after a
crash, and keep GPU access. The unit files are templates in ``agent/service_templates/`` (package
data, so they ship in the wheel) rendered with this machine's paths; the service runs the *exact*
interpreter that ran ``install`` (``sys.executable`` as invoked, never symlink-resolved: resolving
a venv's ``python`` would escape the venv).

Everything is planned first as a :class:`ServicePlan` (files to write or remove, commands to run)
and executed second, so ``--dry-run`` shows exactly what would happen and tests can render every
platform's files on any platform without installing anything.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

import platformdirs

from agent.home import default_home
from security.errors import PanalError

__all__ = [
    "LAUNCHD_LABEL",
    "SERVICE_USER",
    "SYSTEMD_UNIT",
    "WINDOWS_TASK",
    "Action",
    "Command",
    "FileWrite",
    "Platform",
    "Scope",
    "ServiceError",
    "ServicePlan",
    "ServiceTarget",
    "agent_argv",
    "detect_platform",
    "execute",
    "installed_scope",
    "plan",
    "render_launchd_plist",
    "render_systemd_unit",
    "render_windows_task",
]

SYSTEMD_UNIT = "panal-agent.service"
LAUNCHD_LABEL = "io.panal.agent"
WINDOWS_TASK = "panal-agent"
SERVICE_USER = "panal"
SYSTEM_HOME = Path("/var/lib/panal")
DEVICE_GROUPS = ("video", "render")  # own /dev/nvidia*, /dev/dri/*, /dev/kfd on common distros
TEMPLATES = "service_templates"  # a data folder inside the agent package
LOG_LINES = 200


class ServiceError(PanalError):
    """The service could not be planned or a platform command failed; ``message`` says why."""

    status = 500
    code = "service"


class Platform(StrEnum):
    SYSTEMD = "systemd"
    LAUNCHD = "launchd"
    SCHTASKS = "schtasks"


class Scope(StrEnum):
    USER = "user"
    SYSTEM = "system"


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
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class ServiceTarget:
    """Where and how the service lives on this machine: everything rendering needs, injectable."""

    platform: Platform
    scope: Scope
    python: Path
    panal_home: Path
    user_home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=lambda: os.getuid() if hasattr(os, "getuid") else 0)
    windows_user: str = ""

    @classmethod
    def detect(cls, scope: Scope = Scope.USER, *, home: Path | None = None,
               python: Path | None = None) -> ServiceTarget:
        """This machine, this interpreter. The system service's home is fixed at /var/lib/panal."""
        platform = detect_platform()
        if scope is Scope.SYSTEM and platform is not Platform.SYSTEMD:
            raise ServiceError(
                f"--system is only supported with systemd (Linux); on {platform} use --user: "
                "the agent must run in the volunteer's session to reach its GPU")
        panal_home = SYSTEM_HOME if scope is Scope.SYSTEM else (home or default_home())
        domain, user = os.environ.get("USERDOMAIN", ""), os.environ.get("USERNAME", "")
        return cls(platform=platform, scope=scope,
                   python=Path(os.path.abspath(python or sys.executable)),
                   panal_home=Path(os.path.abspath(panal_home)),
                   windows_user=f"{domain}\\{user}" if domain else user)

    @property
    def service_file(self) -> Path:
        if self.platform is Platform.SYSTEMD:
            if self.scope is Scope.SYSTEM:
                return Path("/etc/systemd/system") / SYSTEMD_UNIT
            config = Path(os.environ.get("XDG_CONFIG_HOME") or self.user_home / ".config")
            return config / "systemd" / "user" / SYSTEMD_UNIT
        if self.platform is Platform.LAUNCHD:
            return self.user_home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        return self.panal_home / "panal-agent-task.xml"

    @property
    def log_file(self) -> Path:
        """Where the agent's output goes where there is no journal (launchd, Task Scheduler)."""
        if self.platform is Platform.LAUNCHD:
            return self.user_home / "Library" / "Logs" / "panal" / "agent.log"
        return self.panal_home / "logs" / "agent.log"


def detect_platform() -> Platform:
    if sys.platform == "darwin":
        return Platform.LAUNCHD
    if sys.platform == "win32":
        return Platform.SCHTASKS
    if sys.platform.startswith("linux") and Path("/run/systemd/system").is_dir():
        return Platform.SYSTEMD
    if sys.platform.startswith("linux"):
        # Containers and non-systemd distros: rendering still works, running systemctl will not.
        return Platform.SYSTEMD
    raise ServiceError(f"no service manager supported on {sys.platform}: run `panal agent run` yourself")


def agent_argv(python: Path) -> list[str]:
    """The agent's command line: the installing interpreter running panal's launcher (which first
    checks that ``agent``, ``hub``... are panal's own packages, then runs the CLI)."""
    return [str(python), "-m", "panal_launch", "agent", "run"]


def _template(name: str) -> Template:
    resource = resources.files("agent") / TEMPLATES / name
    try:
        return Template(resource.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServiceError(f"service template {resource} is missing: {exc.strerror}") from exc


def _device_groups() -> list[str]:
    """The GPU device groups that exist here: systemd refuses to start with an unknown group."""
    import grp  # POSIX only; this module must still import on Windows

    present = []
    for name in DEVICE_GROUPS:
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        present.append(name)
    return present


def _systemd_quote(word: str) -> str:
    if word and all(c.isalnum() or c in "/._-+=:@," for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd_unit(target: ServiceTarget, *, groups: Sequence[str] | None = None) -> str:
    """The unit text for ``target``: user units skip the system-only user, groups and sandbox."""
    system = target.scope is Scope.SYSTEM
    off = "" if system else "#(system only) "
    if system:
        groups = _device_groups() if groups is None else list(groups)
        groups_line = (f"SupplementaryGroups={' '.join(groups)}" if groups
                       else "# no video or render group on this machine")
    else:
        groups_line = off + "SupplementaryGroups=" + " ".join(DEVICE_GROUPS)
    home = str(target.panal_home)
    if any(c.isspace() for c in home) or "%" in home:
        raise ServiceError(f"PANAL_HOME {home!r} contains spaces or '%': "
                           "choose a simpler path for the service")
    # ProtectHome=yes would hide an interpreter or venv under /home or /root from the service.
    under_home = any(str(p).startswith(("/home/", "/root/", "/run/user/"))
                     for p in (target.python, target.panal_home))
    return _template("panal-agent.service").substitute(
        system_only=off,
        exec_start=" ".join(_systemd_quote(w) for w in agent_argv(target.python))
        .replace("%", "%%").replace("$", "$$"),
        panal_home=home,
        service_user=SERVICE_USER,
        groups_line=groups_line,
        protect_home="read-only" if under_home else "yes",
        wanted_by="multi-user.target" if system else "default.target",
    )


def render_launchd_plist(target: ServiceTarget) -> str:
    return _template("io.panal.agent.plist").substitute(
        label=LAUNCHD_LABEL, python=escape(str(target.python)),
        panal_home=escape(str(target.panal_home)), log_file=escape(str(target.log_file)))


def _windows_quote(arg: str) -> str:
    return subprocess.list2cmdline([arg])


def render_windows_task(target: ServiceTarget, *, platform_home: Path | None = None) -> str:
    """Task Scheduler XML. PANAL_HOME is passed through ``cmd.exe /c set`` only when it differs
    from the default, because a task's Exec action has no environment of its own."""
    if platform_home is None:
        platform_home = Path(platformdirs.user_data_dir("panal", appauthor=False))
    python = target.python
    pythonw = python.with_name("pythonw.exe")  # no console window at logon, where it exists
    if python.name.lower() == "python.exe" and pythonw.exists():
        python = pythonw
    argv = agent_argv(python)
    if os.path.normcase(str(target.panal_home)) == os.path.normcase(str(platform_home)):
        command, arguments = argv[0], subprocess.list2cmdline(argv[1:])
    else:
        command = "cmd.exe"
        arguments = (f'/d /c "set "PANAL_HOME={target.panal_home}" && '
                     f'{subprocess.list2cmdline(argv)}"')
    user_id = target.windows_user or os.environ.get("USERNAME", "")
    if not user_id:
        raise ServiceError("cannot tell the Windows user to run the task as (USERNAME is not set)")
    return _template("panal-agent-task.xml").substitute(
        task_name=WINDOWS_TASK, user_id=escape(user_id), command=escape(command),
        arguments=escape(arguments), panal_home=escape(str(target.panal_home)))


def _systemctl(target: ServiceTarget, *args: str, check: bool = True, interactive: bool = False) -> Command:
    scope = ("--user",) if target.scope is Scope.USER else ()
    return Command(("systemctl", *scope, *args), check=check, interactive=interactive)


def _plan_systemd(target: ServiceTarget, action: Action, *, follow: bool, lines: int) -> ServicePlan:
    unit = target.service_file
    system = target.scope is Scope.SYSTEM
    if action is Action.INSTALL:
        notes: list[str] = []
        commands: list[Command] = []
        if system:
            commands.append(Command(("sh", "-c", f"getent passwd {SERVICE_USER} >/dev/null || useradd "
                                     f"--system --user-group --home-dir {SYSTEM_HOME} --no-create-home "
                                     f"--shell /usr/sbin/nologin {SERVICE_USER}")))
            commands.append(Command(("install", "-d", "-m", "0700", "-o", SERVICE_USER, "-g", SERVICE_USER,
                                     str(target.panal_home))))
            if str(target.python).startswith(("/home/", "/root/")):
                notes.append(f"{target.python} is under a home directory: the '{SERVICE_USER}' user must be "
                             "able to read it; a system-wide venv such as /opt/panal is safer")
            notes.append(f"join a hub as the service user: sudo -u {SERVICE_USER} env PANAL_HOME="
                         f"{target.panal_home} {shlex.join(str(a) for a in agent_argv(target.python)[:3])}"
                         " agent join URL")
        else:
            # Lingering starts the user's manager at boot, so the agent runs without a login.
            commands.append(Command(("loginctl", "enable-linger"), check=False))
        commands += [_systemctl(target, "daemon-reload"),
                     _systemctl(target, "enable", "--now", SYSTEMD_UNIT)]
        return ServicePlan(action, mkdirs=(unit.parent,) + (() if system else (target.panal_home,)),
                           writes=(FileWrite(unit, render_systemd_unit(target)),),
                           commands=tuple(commands), notes=tuple(notes))
    if action is Action.UNINSTALL:
        disable = _systemctl(target, "disable", "--now", SYSTEMD_UNIT, check=False)
        return ServicePlan(action, commands=(disable,), removes=(unit,),
                           notes=(f"the agent's data in {target.panal_home} is kept",))
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
         lines: int = LOG_LINES) -> ServicePlan:
    """What ``action`` does for ``target``; nothing is touched."""
    planner = {Platform.SYSTEMD: _plan_systemd, Platform.LAUNCHD: _plan_launchd,
               Platform.SCHTASKS: _plan_schtasks}[target.platform]
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
    status = 0
    for cmd in service_plan.commands:
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
    for path in service_plan.removes:
        try:
            path.unlink(missing_ok=True)
            echo(f"removed {path}")
        except OSError as exc:
            raise ServiceError(f"cannot remove {path}: {exc.strerror}") from exc
    for note in service_plan.notes:
        echo(f"note: {note}")
    return status
