"""The service's unit files (systemd unit, launchd plist, Task Scheduler XML), rendered for a target.

The files are templates in ``agent/host/service_templates/`` (package data, so they ship in the
wheel), filled in with this machine's paths.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

import platformdirs

from agent.host.service_target import (
    LAUNCHD_LABEL,
    SERVICE_USER,
    WINDOWS_TASK,
    Scope,
    ServiceError,
    ServiceTarget,
    agent_argv,
)

__all__ = ["DEVICE_GROUPS", "installed_extras", "missing_device_groups", "render_launchd_plist",
           "render_systemd_unit", "render_windows_task"]

DEVICE_GROUPS = ("video", "render")  # own /dev/nvidia*, /dev/dri/*, /dev/kfd on common distros
TEMPLATES = "service_templates"  # a data folder inside the agent.host package
INSTALLED_MARK = "# panal-installed: "


def _template(name: str) -> Template:
    resource = resources.files("agent.host") / TEMPLATES / name
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


def render_systemd_unit(target: ServiceTarget, *, groups: Sequence[str] | None = None,
                        installed: Sequence[str] = ()) -> str:
    """The unit text for ``target``: a user unit leaves out the system-only user, groups and sandbox.
    ``installed`` names what the install changed beyond the unit (``enable-linger``), recorded in
    the unit as ``# panal-installed: ...`` lines so uninstall undoes exactly that."""
    system = target.scope is Scope.SYSTEM
    off = "" if system else "#(system only) "   # marks the lines dropped below
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
    text = _template("panal-agent.service").substitute(
        system_only=off,
        exec_start=" ".join(_systemd_quote(w) for w in agent_argv(target.python))
        .replace("%", "%%").replace("$", "$$"),
        panal_home=home,
        service_user=SERVICE_USER,
        groups_line=groups_line,
        protect_home="read-only" if under_home else "yes",
        wanted_by="multi-user.target" if system else "default.target",
    )
    if not system:
        text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(off))
    return text + "".join(f"{INSTALLED_MARK}{what}\n" for what in installed)


def installed_extras(unit_text: str) -> list[str]:
    """What an install recorded in its unit beyond the unit itself (see ``render_systemd_unit``)."""
    return [line[len(INSTALLED_MARK):].strip() for line in unit_text.splitlines() if line.startswith(INSTALLED_MARK)]


def missing_device_groups() -> list[str]:
    """The GPU device groups this machine lacks (the system service cannot join them)."""
    present = _device_groups()
    return [name for name in DEVICE_GROUPS if name not in present]


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
