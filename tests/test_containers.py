"""Deployment packaging: container images, docker compose and Kubernetes, checked with the real tools.

The Kubernetes manifests are validated against the Kubernetes schema offline (kubernetes-validate) and built
with `kubectl kustomize`. No Docker engine runs here: Dockerfiles and compose are checked structurally, and
every `panal ...` command they run is resolved against the real CLI. The OS service files are
tests/test_service.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from agent.cli import main as cli_main
from agent.volunteer.preferences import Preferences
from hub.config import HubConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
K8S = PACKAGING / "k8s"


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
