"""Service files and deployment packaging: rendered, parsed and checked with the real tools.

`systemd-analyze verify` runs on every rendered unit and must print nothing at all (it exits 0
on some warnings). The launchd plist and Task Scheduler XML are parsed back; the Kubernetes
manifests are validated against the Kubernetes schema offline (kubernetes-validate) and built
with `kubectl kustomize`. No Docker engine runs here: Dockerfiles and compose are checked
structurally, and every `panal ...` command they run is resolved against the real CLI.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from agent.cli import main as cli_main
from agent.host.service import Action, Command, FileWrite, ServicePlan, execute, plan
from agent.host.service_target import Platform, Scope, ServiceError, ServiceTarget, agent_argv
from agent.host.service_units import render_launchd_plist, render_systemd_unit, render_windows_task
from agent.volunteer.preferences import Preferences
from hub.config import HubConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
K8S = PACKAGING / "k8s"
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


# -- Dockerfiles ------------------------------------------------------------------------------------
def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (PACKAGING / name).read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE", "STOPSIGNAL",
         "ENTRYPOINT", "CMD", "HEALTHCHECK", "LABEL"}


@pytest.mark.parametrize("name", ["Dockerfile.hub", "Dockerfile.agent"])
def test_dockerfile_structure(name: str) -> None:
    steps = dockerfile(name)
    assert {s for s, _ in steps} <= KNOWN
    assert next(s for s, _ in steps if s != "ARG") == "FROM"
    final = {s: a for s, a in steps}  # the last of each instruction wins, as in Docker
    assert json.loads(final["ENTRYPOINT"]) == ["panal-entrypoint"]
    assert final["USER"] == "panal"
    for step, args in steps:
        if step != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
    assert any(s == "COPY" and "packaging/docker-entrypoint.sh /usr/local/bin/panal-entrypoint" in a
               for s, a in steps)


def test_hub_image_is_slim_and_agent_image_has_a_cuda_and_a_cpu_variant() -> None:
    hub = dockerfile("Dockerfile.hub")
    hub_text = " ".join(a for _, a in hub)
    assert "torch" not in hub_text and "[agent]" not in hub_text
    assert all(a.startswith("python:3.11-slim") for s, a in hub if s == "FROM")
    assert any(s == "RUN" and "pip install" in a and "/tmp/wheels/panal-*.whl" in a for s, a in hub)
    agent = dockerfile("Dockerfile.agent")
    args = dict(a.split("=", 1) for s, a in agent if s == "ARG")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu2[4-9]\.04", args["BASE_IMAGE"])
    assert [a for s, a in agent if s == "FROM"] == ["python:3.11-slim AS build", "${BASE_IMAGE}"]
    assert "cpu" in (PACKAGING / "Dockerfile.agent").read_text().split("TORCH_INDEX_URL=")[1].split()[0]
    assert any(s == "RUN" and '"${whl}[agent]"' in a for s, a in agent)


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each from its FROM on."""
    out: list[list[tuple[str, str]]] = []
    for step in dockerfile(name):
        if step[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(step)
    return out


def wheel_sources() -> set[str]:
    """What the wheel is built from: pyproject's py-modules and packages, its readme, pyproject."""
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools_cfg["packages"]["find"]["include"]}
    return {"pyproject.toml", "README.md", *(f"{m}.py" for m in setuptools_cfg["py-modules"]), *packages}


@pytest.mark.parametrize("name", ["Dockerfile.hub", "Dockerfile.agent"])
def test_image_builds_the_wheel_from_every_source_and_installs_only_the_wheel(name: str) -> None:
    build, final = stages(name)
    copied = {src for s, a in build if s == "COPY" for src in a.split()[:-1]}
    assert wheel_sources() <= copied, f"{name}: the build stage misses {wheel_sources() - copied}"
    assert any(s == "RUN" and "pip wheel" in a and "--no-deps" in a for s, a in build)
    final_copies = [a for s, a in final if s == "COPY"]
    assert "--from=build /wheels /tmp/wheels" in final_copies
    assert [a for a in final_copies if "--from=" not in a] == [
        "--chmod=0755 packaging/docker-entrypoint.sh /usr/local/bin/panal-entrypoint"]


def _resolve(argv: list[str]) -> click.Command:
    """The real CLI command ``panal argv...`` would run; fails on an unknown command or option."""
    command: click.Command = cli_main
    words = list(argv)
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        name = words.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"`panal {' '.join(argv)}`: no command {name!r}"
        command = sub
    ctx = click.Context(command, info_name=argv[0])
    command.parse_args(ctx, words)  # raises click.UsageError on an unknown option
    return command


def packaged_commands() -> list[list[str]]:
    cmds: list[list[str]] = []
    for name in ("Dockerfile.hub", "Dockerfile.agent"):
        cmds += [json.loads(a) for s, a in dockerfile(name) if s == "CMD"]
    compose = yaml.safe_load((PACKAGING / "docker-compose.yml").read_text())
    cmds += [svc["command"] for svc in compose["services"].values()]
    for doc in k8s_documents():
        if doc["kind"] in ("Deployment", "DaemonSet"):
            cmds += [c["args"] for c in doc["spec"]["template"]["spec"]["containers"]]
    script = (PACKAGING / "docker-entrypoint.sh").read_text()
    for line in script.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip() else []
        if words[:1] == ["panal"] and "$@" not in line:
            cmds.append([w if not w.startswith("$") else "VALUE" for w in words[1:]])
    return cmds


def test_every_packaged_command_exists_in_the_cli() -> None:
    cmds = packaged_commands()
    seen = {" ".join(w for w in c if not w.startswith(("-", "/", "VALUE"))) for c in cmds}
    assert {"hub serve", "hub init", "agent run", "agent join"} <= seen
    for argv in cmds:
        _resolve(argv)


def test_the_cli_resolver_rejects_unknown_commands() -> None:
    with pytest.raises(AssertionError):
        _resolve(["hub", "no-such-command"])
    with pytest.raises(click.UsageError):
        _resolve(["hub", "serve", "--no-such-flag"])


def _fake_panal(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `panal` on PATH that records its arguments, to run the real entrypoint script."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake = bin_dir / "panal"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PANAL_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    return env, log


def test_entrypoint_initialises_the_hub_then_serves(tmp_path: Path) -> None:
    env, log = _fake_panal(tmp_path)
    script = str(PACKAGING / "docker-entrypoint.sh")
    subprocess.run(["sh", script, "hub", "serve", "--dir", "/data"], env={**env, "PANAL_HUB_HOST": "hub"},
                   check=True, timeout=30)
    assert log.read_text().splitlines() == ["hub init --dir /data --host hub", "hub serve --dir /data"]


def test_entrypoint_joins_once_then_runs(tmp_path: Path) -> None:
    env, log = _fake_panal(tmp_path)
    env["PANAL_JOIN_URL"] = "https://hub:8747/#sha256=ab"
    script = str(PACKAGING / "docker-entrypoint.sh")
    for _ in range(2):
        subprocess.run(["sh", script, "agent", "run"], env=env, check=True, timeout=30)
    assert log.read_text().splitlines() == ["agent join https://hub:8747/#sha256=ab", "agent run",
                                            "agent run"]
    subprocess.run(["sh", script, "agent", "info"], env=env, check=True, timeout=30)
    assert log.read_text().splitlines()[-1] == "agent info"


# -- docker compose ---------------------------------------------------------------------------------
def test_compose_runs_a_hub_and_two_gpu_agents_with_volumes() -> None:
    compose = yaml.safe_load((PACKAGING / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"hub", "agent-1", "agent-2"}
    declared = set(compose["volumes"])
    for name, svc in services.items():
        build = svc["build"]
        assert (PACKAGING / build["context"] / build["dockerfile"]).is_file(), name
        for volume in svc["volumes"]:
            source, target_path = volume.split(":")[:2]
            assert source in declared and target_path == "/data", name
        assert svc["restart"] == "unless-stopped"
    for name in ("agent-1", "agent-2"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert services[name]["environment"]["PANAL_HOME"] == "/data"
        assert "PANAL_JOIN_URL" in services[name]["environment"]
        assert services[name]["depends_on"] == ["hub"]
    assert services["agent-1"]["volumes"] != services["agent-2"]["volumes"]  # own identity each
    assert services["hub"]["ports"] == ["8747:8747"]


# -- Kubernetes -------------------------------------------------------------------------------------
def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["kind"] == kind]


def test_k8s_manifests_validate_against_the_kubernetes_schema() -> None:
    docs = k8s_documents()
    assert sorted(d["kind"] for d in docs) == sorted(
        ["Namespace", "ConfigMap", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
         "Secret", "DaemonSet"])
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validator_rejects_a_broken_manifest() -> None:
    """The validation above works offline and can fail."""
    broken = by_kind("DaemonSet")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_agent_daemonset_asks_for_gpus_on_gpu_nodes() -> None:
    ds = by_kind("DaemonSet")[0]["spec"]["template"]["spec"]
    agent = ds["containers"][0]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ds["tolerations"]
    assert ds["nodeSelector"]
    env = {e["name"]: e for e in agent["env"]}
    ref = env["PANAL_JOIN_URL"]["valueFrom"]["secretKeyRef"]
    secret = by_kind("Secret")[0]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["volumes"]}
    assert set(mounts) <= set(volumes)
    prefs_map = next(c for c in by_kind("ConfigMap")
                     if c["metadata"]["name"] == volumes["prefs"]["configMap"]["name"])
    assert mounts["prefs"]["mountPath"] == f"{env['PANAL_HOME']['value']}/{mounts['prefs']['subPath']}"
    assert isinstance(Preferences.from_mapping(yaml.safe_load(prefs_map["data"]["prefs.yaml"])), Preferences)


def test_hub_deployment_service_and_claim_fit_together() -> None:
    deployment = by_kind("Deployment")[0]
    pod = deployment["spec"]["template"]
    service = by_kind("Service")[0]
    claim = by_kind("PersistentVolumeClaim")[0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hub = pod["spec"]["containers"][0]
    port_names = {p["name"] for p in hub["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [claim["metadata"]["name"]]
    config_name = hub["envFrom"][0]["configMapRef"]["name"]
    config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == config_name)
    loaded = HubConfig.load(env=config["data"])  # the real loader accepts every setting given
    assert loaded.host == config["data"]["PANAL_HUB_HOST"]


def test_kustomize_builds_every_manifest(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl") or "/usr/bin/kubectl"
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": str(tmp_path / "none")}, check=False)
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(d["kind"] for d in built) == sorted(d["kind"] for d in k8s_documents())
