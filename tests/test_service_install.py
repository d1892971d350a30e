"""Service install polish: a user unit holds only what applies to it, lingering is asked for (never
silently turned on), uninstall removes what install added and then reloads systemd, install warns
when the agent has joined no board, and ``--system`` explains a missing ``render`` group.

No systemd runs here: plans are carried out by the real :func:`execute` (files written and removed
for real) with a runner that records the systemctl/loginctl command lines instead of running them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli.service import service
from agent.host.service import Action, InstallChoices, execute, plan
from agent.host.service_target import Platform, Scope, ServiceTarget
from agent.host.service_units import installed_extras, render_systemd_unit

PYTHON = Path(os.path.abspath(sys.executable))


def user_target(tmp_path: Path) -> ServiceTarget:
    return ServiceTarget(Platform.SYSTEMD, Scope.USER, PYTHON, tmp_path / "panal-home", user_home=tmp_path / "user")


class Recorder:
    """Stands in for systemctl and loginctl (no systemd here): records each command line, and whether
    the unit file existed when it ran."""

    def __init__(self, unit: Path) -> None:
        self.unit = unit
        self.calls: list[tuple[tuple[str, ...], bool]] = []

    def __call__(self, argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((tuple(argv), self.unit.exists()))
        return subprocess.CompletedProcess(argv, 0, "", "")

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]


def test_the_user_unit_carries_no_system_only_lines(tmp_path: Path) -> None:
    text = render_systemd_unit(user_target(tmp_path))
    assert "#(system only)" not in text and "system only" not in text
    keys = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
    assert not keys & {"User", "ProtectSystem", "SupplementaryGroups", "StateDirectory", "PrivateTmp"}
    system = render_systemd_unit(ServiceTarget(Platform.SYSTEMD, Scope.SYSTEM, PYTHON, Path("/var/lib/panal")),
                                 groups=["video", "render"])
    assert "\nUser=panal\n" in system and "#(system only)" not in system


def test_lingering_is_turned_on_only_when_asked_and_turned_off_by_uninstall(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    t = user_target(tmp_path)
    quiet = plan(t, Action.INSTALL)
    assert not [c for c in quiet.commands if c.argv[0] == "loginctl"]
    assert any("--linger" in n for n in quiet.notes)

    asked = plan(t, Action.INSTALL, choices=InstallChoices(linger=True))
    recorder = Recorder(t.service_file)
    execute(asked, runner=recorder, echo=lambda _: None)
    assert ("loginctl", "enable-linger") in recorder.argvs
    assert installed_extras(t.service_file.read_text()) == ["enable-linger"]

    undo = Recorder(t.service_file)
    execute(plan(t, Action.UNINSTALL), runner=undo, echo=lambda _: None)
    assert not t.service_file.exists()
    assert undo.calls[0] == (("systemctl", "--user", "disable", "--now", "panal-agent.service"), True)
    assert ("loginctl", "disable-linger") in undo.argvs
    # systemd forgets the unit only once its file is gone.
    assert (("systemctl", "--user", "daemon-reload"), False) in undo.calls


def test_uninstall_leaves_lingering_it_did_not_turn_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    t = user_target(tmp_path)
    already = plan(t, Action.INSTALL, choices=InstallChoices(linger=True, linger_already=True))
    assert not [c for c in already.commands if c.argv[0] == "loginctl"]
    execute(already, runner=Recorder(t.service_file), echo=lambda _: None)
    undo = Recorder(t.service_file)
    execute(plan(t, Action.UNINSTALL), runner=undo, echo=lambda _: None)
    assert not [a for a in undo.argvs if a[0] == "loginctl"] and not t.service_file.exists()


def test_a_system_install_explains_a_missing_render_group(tmp_path: Path) -> None:
    t = ServiceTarget(Platform.SYSTEMD, Scope.SYSTEM, PYTHON, Path("/var/lib/panal"))
    lacking = plan(t, Action.INSTALL, choices=InstallChoices(groups=("video",)))
    [note] = [n for n in lacking.notes if "'render' group" in n]
    assert "groupadd --system render" in note and "NVIDIA" in note
    complete = plan(t, Action.INSTALL, choices=InstallChoices(groups=("video", "render")))
    assert not [n for n in complete.notes if "'render' group" in n]


def test_install_warns_when_the_agent_has_joined_no_board(tmp_path: Path) -> None:
    env = {"PANAL_HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = CliRunner().invoke(service, ["install", "--user", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert "warning: this agent has joined no board" in result.output
    assert "panal agent join JOIN_URL" in result.output
    assert "loginctl" not in result.output.split("note:")[0]   # a dry run asks nothing and lingers not
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "boards.yaml").write_text("- {url: 'https://127.0.0.1:1', fingerprint: null}\n")
    joined = CliRunner().invoke(service, ["install", "--user", "--dry-run", "--linger"], env=env)
    assert joined.exit_code == 0 and "joined no board" not in joined.output
    assert "run   loginctl enable-linger" in joined.output or "linger" in joined.output
