"""The agent as an OS service: rendered, parsed and checked with the real tools.

`systemd-analyze verify` runs on every rendered unit and must print nothing at all (it exits 0
on some warnings). The launchd plist and Task Scheduler XML are parsed back. Container images,
compose and Kubernetes are tests/test_containers.py.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent.host.service import Action, Command, FileWrite, ServicePlan, execute, plan
from agent.host.service_target import Platform, Scope, ServiceError, ServiceTarget, agent_argv
from agent.host.service_units import render_launchd_plist, render_systemd_unit, render_windows_task

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
PYTHON = Path(os.path.abspath(sys.executable))  # the venv's python, not resolved: as install does
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def target(tmp_path: Path, platform: Platform, scope: Scope = Scope.USER, *,
           python: Path = PYTHON, home: Path | None = None) -> ServiceTarget:
    return ServiceTarget(platform, scope, python, home or tmp_path / "panal-home",
                         user_home=tmp_path / "user", uid=501, windows_user="DESKTOP\\vol")


def verify_unit(tmp_path: Path, text: str, scope: Scope) -> subprocess.CompletedProcess[str]:
    unit_dir = tmp_path / f"unit-{scope}"
    unit_dir.mkdir()
    unit = unit_dir / "panal-agent.service"
    unit.write_text(text)
    env = dict(os.environ)
    argv = [SYSTEMD_ANALYZE]
    if scope is Scope.USER:
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # a user manager needs one, even to verify
        argv.append("--user")
    return subprocess.run([*argv, "verify", str(unit)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def directives(unit_text: str) -> dict[str, list[str]]:
    """Active (uncommented) directives of a unit: key -> values."""
    out: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- systemd ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", [Scope.USER, Scope.SYSTEM])
def test_systemd_unit_verifies_without_any_output(tmp_path: Path, scope: Scope) -> None:
    text = render_systemd_unit(target(tmp_path, Platform.SYSTEMD, scope), groups=["video"])
    done = verify_unit(tmp_path, text, scope)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing interpreter and an unknown key are both reported."""
    text = render_systemd_unit(target(tmp_path, Platform.SYSTEMD, Scope.SYSTEM,
                                      python=tmp_path / "no-such" / "python"), groups=["video"])
    done = verify_unit(tmp_path, text.replace("Nice=10", "Nice=10\nNoSuchKey=1"), Scope.SYSTEM)
    output = done.stdout + done.stderr
    assert "not executable" in output
    assert "NoSuchKey" in output


def test_system_unit_runs_unprivileged_with_gpu_groups_and_hardening(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.SYSTEMD, Scope.SYSTEM, home=Path("/var/lib/panal"))
    d = directives(render_systemd_unit(t, groups=["video", "render"]))
    assert d["ExecStart"] == [shlex.join(agent_argv(PYTHON))]
    assert d["Environment"][0] == "PANAL_HOME=/var/lib/panal"
    assert d["User"] == ["panal"]
    assert d["SupplementaryGroups"] == ["video render"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["RestartSec"][0]) >= 5
    assert d["StandardOutput"] == ["journal"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ReadWritePaths": "/var/lib/panal", "ProtectHome": "yes"}.items():
        assert d[key] == [value], key
    # Anything that closes the device cgroup or hides /dev would cut the agent off its GPU.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "PrivateUsers"):
        assert key not in d, key
    assert d["WantedBy"] == ["multi-user.target"]


def test_system_unit_keeps_a_venv_under_home_readable(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.SYSTEMD, Scope.SYSTEM, python=Path("/home/vol/venv/bin/python"),
               home=Path("/var/lib/panal"))
    assert directives(render_systemd_unit(t, groups=[]))["ProtectHome"] == ["read-only"]


def test_user_unit_has_no_system_only_settings(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.SYSTEMD, Scope.USER)
    text = render_systemd_unit(t)
    d = directives(text)
    for key in ("User", "SupplementaryGroups", "ProtectSystem", "PrivateTmp", "StateDirectory"):
        assert key not in d, key
    assert "system only" not in text and "User=" not in text   # only what applies to a user unit
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["WantedBy"] == ["default.target"]
    assert d["Environment"][0] == f"PANAL_HOME={t.panal_home}"


def test_unit_quotes_an_interpreter_path_with_spaces(tmp_path: Path) -> None:
    spaced = tmp_path / "my venv" / "bin"
    spaced.mkdir(parents=True)
    (spaced / "python").symlink_to(PYTHON)
    text = render_systemd_unit(target(tmp_path, Platform.SYSTEMD, python=spaced / "python"))
    assert directives(text)["ExecStart"] == [f'"{spaced / "python"}" -m panal_launch agent run']
    done = verify_unit(tmp_path, text, Scope.USER)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_unit_refuses_a_home_with_spaces(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="spaces"):
        render_systemd_unit(target(tmp_path, Platform.SYSTEMD, home=tmp_path / "a b"))


def test_agent_command_line_is_a_real_cli_command(tmp_path: Path) -> None:
    """What every service file runs: `python -m panal_launch agent run` must exist."""
    done = subprocess.run([*agent_argv(PYTHON), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PANAL_HOME": str(tmp_path)}, check=False)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout


# -- plans ------------------------------------------------------------------------------------------
def test_user_install_plan_writes_the_unit_and_enables_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    t = target(tmp_path, Platform.SYSTEMD, Scope.USER)
    p = plan(t, Action.INSTALL)
    assert [w.path for w in p.writes] == [tmp_path / "user" / ".config/systemd/user/panal-agent.service"]
    assert t.panal_home in p.mkdirs
    argvs = [c.argv for c in p.commands]
    assert ("systemctl", "--user", "daemon-reload") in argvs
    assert argvs[-1] == ("systemctl", "--user", "enable", "--now", "panal-agent.service")
    assert "ExecStart=" in p.describe()


def test_system_install_plan_creates_the_service_user_first(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.SYSTEMD, Scope.SYSTEM, home=Path("/var/lib/panal"))
    p = plan(t, Action.INSTALL)
    assert p.writes[0].path == Path("/etc/systemd/system/panal-agent.service")
    assert "useradd --system" in str(p.commands[0])
    assert p.commands[-1].argv == ("systemctl", "enable", "--now", "panal-agent.service")
    assert any("sudo -u panal" in n for n in p.notes)


@pytest.mark.parametrize("platform", list(Platform))
def test_every_action_has_a_plan(tmp_path: Path, platform: Platform) -> None:
    t = target(tmp_path, platform)
    for action in Action:
        p = plan(t, action, follow=True, lines=50)
        assert p.commands, (platform, action)
    logs = plan(t, Action.LOGS, follow=True, lines=50).commands[0]
    assert logs.interactive and "50" in str(logs)


def test_execute_writes_files_and_reports_a_failing_command(tmp_path: Path) -> None:
    out = tmp_path / "etc" / "unit.service"
    ok = ServicePlan(Action.INSTALL, mkdirs=(out.parent,), writes=(FileWrite(out, "x\n", 0o640),),
                     commands=(Command(("true",)),))
    assert execute(ok, echo=lambda _: None) == 0
    assert out.read_text() == "x\n" and (out.stat().st_mode & 0o777) == 0o640
    bad = ServicePlan(Action.INSTALL, commands=(Command(("sh", "-c", "echo boom >&2; exit 3")),))
    with pytest.raises(ServiceError, match="exit status 3: boom"):
        execute(bad, echo=lambda _: None)
    missing = ServicePlan(Action.START, commands=(Command(("no-such-service-manager-xyz",)),))
    with pytest.raises(ServiceError, match="not installed or not on PATH"):
        execute(missing, echo=lambda _: None)
    tolerated = ServicePlan(Action.UNINSTALL, commands=(Command(("false",), check=False),), removes=(out,))
    execute(tolerated, echo=lambda _: None)
    assert not out.exists()


# -- launchd ----------------------------------------------------------------------------------------
def test_launchd_plist_round_trips_with_required_keys(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.LAUNCHD, home=tmp_path / "odd & <home>")
    data = plistlib.loads(render_launchd_plist(t).encode())
    assert data["Label"] == "io.panal.agent"
    assert data["ProgramArguments"] == agent_argv(PYTHON)
    assert data["EnvironmentVariables"]["PANAL_HOME"] == str(tmp_path / "odd & <home>")
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(data["ThrottleInterval"], int) and data["ThrottleInterval"] >= 5
    assert data["StandardOutPath"] == data["StandardErrorPath"] == str(t.log_file)
    assert data["ProcessType"] == "Background"
    plist_path = plan(t, Action.INSTALL).writes[0].path
    assert plist_path == tmp_path / "user/Library/LaunchAgents/io.panal.agent.plist"


# -- Windows Task Scheduler -------------------------------------------------------------------------
def _task(xml_text: str) -> ET.Element:
    return ET.fromstring(xml_text.encode("utf-16"))


def test_windows_task_parses_and_carries_the_command(tmp_path: Path) -> None:
    python = Path("C:\\Program Files\\Python311\\python.exe")
    home = Path("C:\\Users\\vol\\AppData\\Local\\panal")
    t = target(tmp_path, Platform.SCHTASKS, python=python, home=home)
    root = _task(render_windows_task(t, platform_home=home))
    assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS) == str(python)
    assert root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS) == "-m panal_launch agent run"
    assert root.findtext("t:Triggers/t:LogonTrigger/t:UserId", namespaces=TASK_NS) == "DESKTOP\\vol"
    assert root.find("t:Settings/t:RestartOnFailure", TASK_NS) is not None
    assert root.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=TASK_NS) == "PT0S"
    assert root.findtext("t:Principals/t:Principal/t:RunLevel", namespaces=TASK_NS) == "LeastPrivilege"


def test_windows_task_passes_a_custom_home_through_cmd(tmp_path: Path) -> None:
    python = Path("C:\\py\\python.exe")
    t = target(tmp_path, Platform.SCHTASKS, python=python, home=Path("D:\\panal & co"))
    root = _task(render_windows_task(t, platform_home=Path("C:\\default")))
    assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS) == "cmd.exe"
    args = root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS) or ""
    assert 'set "PANAL_HOME=D:\\panal & co"' in args and str(python) in args


def test_windows_install_writes_utf16_and_registers_the_task(tmp_path: Path) -> None:
    t = target(tmp_path, Platform.SCHTASKS)
    p = plan(t, Action.INSTALL)
    assert p.writes[0].encoding == "utf-16"
    assert p.commands[0].argv[:3] == ("schtasks", "/Create", "/TN")
    assert "/XML" in p.commands[0].argv
