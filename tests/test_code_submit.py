"""The submitter's side of the python kind: reproducible bundles, code checked before upload, run-local."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import panal

from jobs.code_bundle import ENTRY_FILE, pack
from jobs.manifest import ManifestError
from jobs.manifest_files import load_manifests
from jobs.requirements import Capabilities, Requirements, explain, unmet
from security.errors import BadRequest

TRAIN = "import helper\n\ndef run(params, ctx):\n    return {'y': helper.f(params['x'])}\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def job(tmp: Path, code: str, extra: str = "") -> Path:
    path = tmp / "job.yaml"
    path.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: mine}\nspec:\n  task: python\n"
                    f"  code: {code}\n  params: {{x: 1}}\n{extra}")
    return path


def test_the_same_tree_packs_to_the_same_bytes_wherever_and_whenever_it_lies(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"train.py": TRAIN, "helper.py": "def f(x):\n    return x\n", "data/x.txt": "1"})
    first = pack(a, "train:run")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    # a different place, other mtimes and modes, and caches that are not code
    os.utime(b / "train.py", (1, 1))
    (b / "helper.py").chmod(0o600)
    tree(b, {"__pycache__/train.cpython-311.pyc": "junk", ".git/HEAD": "ref", "helper.pyc": "junk"})
    assert pack(b, "train:run") == pack(a, "train:run") == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["data/x.txt", "helper.py", "train.py", ENTRY_FILE]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    assert pack(a, "train:main") != first   # the entry point is part of what is signed


def test_links_and_oversize_trees_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    linked = tree(tmp_path / "l", {"train.py": TRAIN})
    (linked / "secret").symlink_to("/etc/hostname")
    with pytest.raises(BadRequest, match="a bundle holds no links"):
        pack(linked, "train:run")
    big = tree(tmp_path / "big", {"train.py": TRAIN})
    (big / "weights.bin").write_bytes(b"\0" * (33 * 2**20))
    with pytest.raises(BadRequest, match=r"over 32 MiB \(at weights.bin\); ship data sets and weights as spec.inputs"):
        pack(big, "train:run")


def test_validate_names_the_file_and_line_of_a_syntax_error_and_submit_uploads_nothing(tmp_path: Path) -> None:
    tree(tmp_path / "src", {"train.py": TRAIN, "helper.py": "def f(x):\n    return x +\n"})
    path = job(tmp_path, "{path: ./src, entry: 'train:run'}")
    out = panal("validate", str(path), home=tmp_path / "home", check=False)
    assert out.returncode == 1
    assert f"{path}:6:3: spec.code: helper.py:2: syntax error: invalid syntax" in out.stderr
    # submit stops at the same check: no board is contacted (none listens on port 9), nothing is uploaded
    sub = panal("submit", str(path), "--hub", "https://127.0.0.1:9", home=tmp_path / "home", check=False)
    assert sub.returncode == 1 and "helper.py:2: syntax error" in sub.stderr and "network" not in sub.stderr


def test_a_missing_entry_point_or_code_path_is_refused_before_upload(tmp_path: Path) -> None:
    tree(tmp_path / "src", {"train.py": TRAIN, "helper.py": "def f(x):\n    return x\n"})
    (tmp_path / "solo.py").write_text("def main(params, ctx):\n    return {}\n")
    cases = {"./src": "main.py: entry module 'main' is not in the code (it holds helper.py, train.py); "
                      "set spec.code.entry",
             "./solo.py": "solo.py: entry function 'run' is not defined at the top level",
             "./nowhere": "spec.code: not found:",
             "{path: ./src, entry: 'train'}": "spec.code.entry: unexpected format"}
    for code, message in cases.items():
        with pytest.raises(ManifestError) as bad:
            load_manifests(job(tmp_path, code))
        assert message in bad.value.message, (code, bad.value.message)


def test_code_goes_only_to_a_python_job_and_only_once(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "job.yaml").write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: m}\nspec:\n"
                                       "  task: sleep\n  code: ./train.py\n")
    with pytest.raises(ManifestError, match=r"spec\.code: kind sleep runs no code of yours; use task: python"):
        load_manifests(tmp_path / "job.yaml")
    with pytest.raises(ManifestError, match="give the code once"):
        load_manifests(job(tmp_path, "./train.py", "  inputs: {code: ./train.py}\n"))


def test_requires_torch_is_a_version_range_matched_against_the_agents_torch(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("def run(params, ctx):\n    return {}\n")
    with pytest.raises(ManifestError, match=r"spec.requires.torch: expected a version range like \">=2.1,<3\""):
        load_manifests(job(tmp_path, "./train.py", "  requires: {torch: 'two'}\n"))
    [m] = load_manifests(job(tmp_path, "./train.py", "  requires: {torch: '>=2.1,<3', backends: [cuda]}\n"))
    assert m.requires.torch == ">=2.1,<3" and Requirements.from_dict(m.requires.to_dict()) == m.requires
    new, old, local = (Capabilities.from_dict({"packages": {"torch": v}}) for v in ("2.3.1", "1.13.1", "2.4.0a0+git"))
    req = Requirements(torch=">=2.1,<3")
    assert (unmet(req, "python", new), unmet(req, "python", old), unmet(req, "python", local)) == ([], ["torch"], [])
    assert unmet(req, "python", Capabilities.from_dict({})) == ["torch"]   # an agent without torch
    assert explain(req, "python", [new, old]) == ["needs torch >=2.1,<3: 1 of 2 connected agents has it"]


def test_sweeps_over_any_param_name_expand_with_the_code(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN.replace("import helper\n", "").replace("helper.f(params['x'])",
                                                                                    "params['x']"))
    [m] = load_manifests(job(tmp_path, "./train.py", "  sweep: {lr: [0.1, 0.01], layers: [[8], [8, 8]]}\n"))
    assert m.n_tasks == 4 and m.points()[3] == {"x": 1, "lr": 0.01, "layers": [8, 8]}
    with pytest.raises(ManifestError, match=r"spec.sweep.lr\[0\]: lr.a: text of"):
        load_manifests(job(tmp_path, "./train.py", f"  sweep: {{lr: [{{a: {'z' * 70_000}}}]}}\n"))


def test_run_local_prints_params_and_values_per_task_and_json(tmp_path: Path) -> None:
    tree(tmp_path / "src", {"train.py": "import helper\n\ndef run(params, ctx):\n"
                                        "    ctx.log('x is', params['x'])\n"
                                        "    return {'y': helper.f(params['x']), 'tag': 'ok'}\n",
                            "helper.py": "def f(x):\n    return 10 / x\n"})
    path = job(tmp_path, "{path: ./src, entry: 'train:run'}", "  sweep: {x: [1, 4, 0]}\n")
    env = {"PANAL_WORKER_PRELOAD": "0"}
    out = panal("run-local", str(path), "--json", home=tmp_path / "home", check=False, **env)
    assert out.returncode == 2, out.stderr   # a task failed: exit 2, as submit --wait does
    report = json.loads(out.stdout)
    assert [(t["params"], t["ok"], t["values"]) for t in report["tasks"]] == [
        ({"x": 1}, True, {"y": 10.0, "tag": "ok"}), ({"x": 4}, True, {"y": 2.5, "tag": "ok"}),
        ({"x": 0}, False, {})]
    assert report["tasks"][0]["notes"] == ["x is 1"]
    assert report["tasks"][2]["error"] == ("ZeroDivisionError: division by zero "
                                           "(at helper.py:2 in f <- train.py:5 in run)")
    table = panal("run-local", str(path), home=tmp_path / "home", check=False, **env)
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0][:5] == ["TASK", "x", "y", "tag", "SECONDS"]
    assert rows[1][:4] == ["0", "1", "10", "ok"] and rows[2][:4] == ["1", "4", "2.5", "ok"]
    assert rows[3][:2] == ["2", "0"] and "invalid_params: ZeroDivisionError" in table.stdout
    # a catalog kind runs the same way
    sleep = tmp_path / "sleep.yaml"
    sleep.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: s}\n"
                     "spec: {task: sleep, sweep: {seconds: [0, 0.1]}}\n")
    slept = json.loads(panal("run-local", str(sleep), "--json", home=tmp_path / "home", **env).stdout)
    assert [t["values"] for t in slept["tasks"]] == [{"slept": 0.0}, {"slept": 0.1}]
