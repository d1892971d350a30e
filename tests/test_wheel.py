"""The built wheel and sdist work outside the checkout: a plain (non-editable) install in a fresh venv.

`pip wheel .` once shipped without ``hub.dispatch`` and without the service templates, so every
command died after a real install while the editable dev install hid it. Here the wheel goes into a
fresh venv that sees the dev venv's dependencies (torch, aiohttp, ...) through a ``.pth`` path line
but not its editable panal (a path added by a ``.pth`` file does not run the ``.pth`` files inside
it), and every command runs from a temp dir, so the checkout's ``./agent`` is never imported.
It also installs a stand-in for Activeloop's ``hub`` 3.0.1, which shares an import name with
panal: ``panal`` must say so in one line instead of a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "hub", "jobs", "security")
DEV_SITE = Path(sysconfig.get_path("purelib"))  # the dev venv's site-packages: the dependencies
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".demo", "hubdata", "artifacts")
MATMUL = """apiVersion: panal/v1
kind: Job
metadata: {name: wheel-matmul}
spec:
  task: matmul
  params: {size: 64, iterations: 1, seed: 0}
"""


def _run(argv: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=timeout)


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (f"{' '.join(map(str, proc.args))} -> {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class Built:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Venv:
    """A fresh venv with the panal wheel; every command runs in ``work`` with its own HOME."""

    root: Path
    site: Path
    work: Path

    def env(self, **extra: str) -> dict[str, str]:
        home = self.work / "home"
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("XDG_")}
        return {**env, "HOME": str(home), "PANAL_HOME": str(home / "panal"), "PANAL_LAN_ENABLED": "false",
                "PYTHONUNBUFFERED": "1", "PATH": f"{self.root / 'bin'}{os.pathsep}{env['PATH']}", **extra}

    def python(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return _run([self.root / "bin" / "python", *args], cwd=self.work, env=self.env(**env), timeout=120)

    def panal(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        """The installed console script, as a user runs it."""
        return _run([self.root / "bin" / "panal", *args], cwd=self.work, env=self.env(**env), timeout=120)


def make_venv(root: Path, *wheels: Path) -> Venv:
    """A venv without pip; the dev venv's pip installs ``wheels`` into it, and only then is the
    dev site-packages added (before, pip would see the dev venv's editable panal as installed)."""
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent))
    python = root / "bin" / "python"
    for wheel in wheels:
        _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                  "--disable-pip-version-check", wheel], cwd=root.parent))
    site = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         cwd=root.parent)).stdout.strip())
    (site / "_panal_test_dev_deps.pth").write_text(f"{DEV_SITE}\n")
    work = root.parent / f"{root.name}-work"
    (work / "home").mkdir(parents=True)
    return Venv(root, site, work)


def fake_hub_wheel(out: Path) -> Path:
    """A stand-in for Activeloop's ``hub`` 3.0.1 (PyPI): a package named hub, nothing else."""
    files = {"hub/__init__.py": b'"""Not panal\'s hub: a data-set library."""\n__version__ = "3.0.1"\n',
             "hub-3.0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: hub\nVersion: 3.0.1\n",
             "hub-3.0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: panal-tests\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n",
             "hub-3.0.1.dist-info/top_level.txt": b"hub\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files["hub-3.0.1.dist-info/RECORD"] = ("\n".join([*record, "hub-3.0.1.dist-info/RECORD,,"]) + "\n").encode()
    path = out / "hub-3.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel (``pip wheel .``) and the sdist (setuptools' PEP 517 hook), built from a copy of the
    source tree so the build leaves no ``build/`` or egg-info in the shared checkout."""
    tmp = tmp_path_factory.mktemp("build")
    src, dist = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--disable-pip-version-check", "-w", dist, "."], cwd=src))
    _ok(_run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
              "build_meta.build_sdist(sys.argv[1])", dist], cwd=src))
    [wheel], [sdist] = sorted(dist.glob("panal-*.whl")), sorted(dist.glob("panal-*.tar.gz"))
    return Built(wheel, sdist)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return make_venv(tmp_path_factory.mktemp("wheel") / "venv", built.wheel)


def package_data_files() -> list[str]:
    """Every non-Python file inside panal's package folders (docs aside): what the code may read."""
    return sorted(p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in p.parts)


def test_wheel_ships_every_data_file_of_the_packages(built: Built) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    data = package_data_files()
    assert {"agent/host/service_templates/panal-agent.service", "hub/static/index.html"} <= set(data)
    assert [f for f in data if f not in names] == []
    assert "panal_launch.py" in names and "hub/dispatch/__init__.py" in names


def test_sdist_ships_the_service_templates_the_status_page_and_the_launcher(built: Built) -> None:
    with tarfile.open(built.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = [*package_data_files(), "panal_launch.py", "pyproject.toml", "README.md"]
    assert [f for f in wanted if f not in names] == []


def test_fresh_venv_imports_panal_from_the_wheel_and_dependencies_from_the_dev_venv(venv: Venv) -> None:
    proc = _ok(venv.python("-c", "import json, sys, agent, hub, jobs, security, panal_launch, aiohttp; "
                                 "print(json.dumps({m.__name__: m.__file__ for m in "
                                 "(agent, hub, jobs, security, panal_launch, aiohttp)})); "
                                 "print(any('editable' in m for m in sys.modules))"))
    files_line, editable = proc.stdout.splitlines()
    files = {name: Path(f) for name, f in json.loads(files_line).items()}
    for name in (*PACKAGES, "panal_launch"):
        assert files[name].is_relative_to(venv.site), (name, files[name])
    assert files["aiohttp"].is_relative_to(DEV_SITE)
    assert editable == "False"  # the dev venv's editable finder is not active


def test_panal_help_runs_from_the_wheel(venv: Venv) -> None:
    out = _ok(venv.panal("--help")).stdout
    assert "Usage: panal" in out and "submit" in out


def test_hub_init_from_the_wheel_prints_a_join_url(venv: Venv) -> None:
    out = _ok(venv.panal("hub", "init", "--dir", venv.work / "hubdata")).stdout
    assert "https://127.0.0.1:8747/#sha256=" in out
    assert (venv.work / "hubdata").is_dir()


def test_schema_from_the_wheel_is_the_manifest_json_schema(venv: Venv) -> None:
    schema = json.loads(_ok(venv.panal("schema")).stdout)
    assert schema["title"] == "panal job manifest" and schema["type"] == "object"


def test_every_example_manifest_validates_with_the_wheel(venv: Venv) -> None:
    examples = sorted((ROOT / "configs" / "examples").glob("*.yaml"))
    assert examples
    lines = _ok(venv.panal("validate", *examples)).stdout.splitlines()
    assert {line.split(": ", 1)[0] for line in lines} == {str(e) for e in examples}, lines
    assert [line for line in lines if ": ok (" not in line] == []


def test_service_dry_run_from_the_wheel_renders_the_systemd_unit(venv: Venv) -> None:
    out = _ok(venv.panal("agent", "service", "install", "--user", "--dry-run")).stdout
    unit = venv.work / "home" / ".config" / "systemd" / "user" / "panal-agent.service"
    assert f"--- write {unit}" in out
    assert f"ExecStart={venv.root / 'bin' / 'python'} -m panal_launch agent run" in out
    assert "[Service]" in out and "[Install]" in out and "${" not in out
    assert not unit.exists()  # a dry run writes nothing


def test_panal_up_from_the_wheel_runs_a_matmul_job(venv: Venv) -> None:
    manifest = venv.work / "matmul.yaml"
    manifest.write_text(MATMUL)
    env = venv.env(PANAL_HOME=str(venv.work / "up-home"))
    log = venv.work / "up.log"
    with log.open("w") as err:
        up = subprocess.Popen([str(venv.root / "bin" / "panal"), "up", "--port", "0"], cwd=venv.work, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=err)
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert "board at http://127.0.0.1:" in line, log.read_text()
        sub = venv.panal("submit", manifest, "--wait", "--json", PANAL_HOME=env["PANAL_HOME"])
        assert sub.returncode == 0, (sub.stdout, sub.stderr, log.read_text()[-3000:])
        [job] = json.loads(sub.stdout)
        assert job["state"] == "succeeded" and job["n_tasks"] == 1
        res = json.loads(_ok(venv.panal("results", job["id"], "--verify", "--json",
                                        PANAL_HOME=env["PANAL_HOME"])).stdout)
        assert [r["verified"] for r in res["results"]] == [True]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        assert up.stdout is not None
        up.stdout.close()


def test_hub_from_the_wheel_imports_without_torch(venv: Venv) -> None:
    out = _ok(venv.python("-c", "import sys; sys.modules['torch'] = None; import hub.server, hub.app; "
                                "print(hub.app.__file__)")).stdout
    assert Path(out.strip()).is_relative_to(venv.site)


@pytest.fixture(scope="module")
def foreign_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_hub_wheel(tmp_path_factory.mktemp("foreign"))


def assert_one_line_clash(proc: subprocess.CompletedProcess[str], resolved: Path) -> None:
    detail = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode != 0, detail
    assert "Traceback" not in proc.stderr and proc.stdout == "", detail
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: panal cannot start: its package 'hub' resolves to {resolved}"), detail
    assert "the distribution hub 3.0.1" in line and "pipx install 'panal[agent]'" in line, detail


def test_a_foreign_hub_earlier_on_the_path_is_reported_in_one_line(venv: Venv, foreign_hub: Path) -> None:
    target = venv.work / "foreign-site"
    _ok(_run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
              "--target", target, foreign_hub], cwd=venv.work))
    proc = venv.panal("--help", PYTHONPATH=str(target))
    assert_one_line_clash(proc, target.resolve() / "hub" / "__init__.py")


def test_a_foreign_hub_installed_over_panal_is_reported_in_one_line(
        built: Built, foreign_hub: Path, tmp_path: Path) -> None:
    clashing = make_venv(tmp_path / "venv", built.wheel, foreign_hub)  # `pip install hub` after panal
    proc = clashing.panal("--help")
    assert_one_line_clash(proc, clashing.site.resolve() / "hub" / "__init__.py")

