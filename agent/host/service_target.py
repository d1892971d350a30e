"""Where the agent's background service lives on this machine: platform, scope, interpreter, paths.

The service runs the *exact* interpreter that ran ``install`` (``sys.executable`` as invoked, never
symlink-resolved: resolving a venv's ``python`` would escape the venv). Every path is a field of
:class:`ServiceTarget`, so tests render every platform's files on any platform.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from agent.host.home import default_home
from security.errors import PanalError

__all__ = [
    "LAUNCHD_LABEL",
    "SERVICE_USER",
    "SYSTEMD_UNIT",
    "SYSTEM_HOME",
    "WINDOWS_TASK",
    "Platform",
    "Scope",
    "ServiceError",
    "ServiceTarget",
    "agent_argv",
    "detect_platform",
]

SYSTEMD_UNIT = "panal-agent.service"
LAUNCHD_LABEL = "io.panal.agent"
WINDOWS_TASK = "panal-agent"
SERVICE_USER = "panal"
SYSTEM_HOME = Path("/var/lib/panal")


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
