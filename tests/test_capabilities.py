"""Capability detection on this (CPU-only) machine, the self-test cache, and fleet-simulating overrides."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from agent.host.capabilities import ENV_FAKE_CAPS, deep_merge, detect
from jobs.catalog import all_kinds
from jobs.committed import UNIT_PROOFS
from jobs.requirements import Capabilities, Requirements, explain, unmet
from security.errors import BadRequest

FAKE_GPU = {"index": 0, "name": "Radeon RX 580", "backend": "rocm", "vendor": "AMD", "vram_gb": 8.0,
            "compute_capability": "8.0", "gflops_fp32": 6000.0, "gflops_fp16": 6000.0}


@pytest.fixture(autouse=True)
def _no_env_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_FAKE_CAPS, raising=False)


def test_real_detection_on_this_machine() -> None:
    caps = detect(measure=False)
    assert caps["os"] == platform.system().lower()
    assert caps["arch"] == platform.machine()
    assert caps["python"] == platform.python_version()
    assert caps["torch"] == torch.__version__
    assert caps["cuda"] == torch.version.cuda
    assert caps["memory_gb"] == pytest.approx(psutil.virtual_memory().total / 2**30, abs=0.1)
    assert caps["cpu"]["threads"] >= caps["cpu"]["cores"] >= 1
    assert caps["cpu"]["model"] and caps["cpu"]["model"] != "unknown"
    assert caps["kinds"] == sorted(all_kinds())
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert caps["gpus"] == [] and caps["gpu_errors"] == []
    else:  # a GPU machine: every advertised GPU passed the smoke test
        assert all("device" in g for g in caps["gpus"])
    parsed = Capabilities.from_dict(caps)
    assert parsed.cpu_cores == caps["cpu"]["cores"]
    assert unmet(Requirements(device="cpu"), "matmul", parsed) == []
    assert parsed.features == {UNIT_PROOFS}   # this agent checks committed jobs' unit proofs
    assert unmet(Requirements(features=(UNIT_PROOFS,)), "matmul", parsed) == []


def test_measured_gflops_are_cached_and_rebench_measures_again(tmp_path: Path) -> None:
    cache = tmp_path / "caps" / "bench.json"
    first = detect(cache_path=cache)
    assert first["cpu"]["gflops_fp32"] > 0
    doc = json.loads(cache.read_text())
    assert doc["results"]["cpu"]["gflops_fp32"] == first["cpu"]["gflops_fp32"]
    doc["results"]["cpu"]["gflops_fp32"] = 12345.0      # proves the next call reads the cache
    cache.write_text(json.dumps(doc))
    assert detect(cache_path=cache)["cpu"]["gflops_fp32"] == 12345.0
    remeasured = detect(cache_path=cache, rebench=True)["cpu"]["gflops_fp32"]
    assert remeasured != 12345.0 and remeasured > 0
    doc = json.loads(cache.read_text())
    doc["key"], doc["results"]["cpu"]["gflops_fp32"] = "other-hardware", 777.0
    cache.write_text(json.dumps(doc))
    assert detect(cache_path=cache)["cpu"]["gflops_fp32"] != 777.0   # another machine's cache is ignored


def test_overrides_deep_merge_and_let_a_fleet_be_simulated() -> None:
    caps = detect(measure=False, overrides={"gpus": [FAKE_GPU], "labels": {"lab": "vision"},
                                            "cpu": {"gflops_fp32": 50.0}})
    assert caps["gpus"] == [FAKE_GPU]
    assert caps["cpu"]["gflops_fp32"] == 50.0
    assert caps["cpu"]["cores"] >= 1                       # merged, not replaced
    assert caps["labels"] == {"lab": "vision"}
    parsed = Capabilities.from_dict(caps)
    wants = Requirements(device="gpu", backends=("rocm",), min_vram_gb=4, labels=(("lab", "vision"),))
    assert unmet(wants, "matmul", parsed) == []
    assert unmet(Requirements(min_vram_gb=16), "matmul", parsed) == ["min_vram_gb"]


def test_env_fake_caps_merge_over_config_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_FAKE_CAPS, json.dumps({"memory_gb": 512, "labels": {"site": "b"}}))
    caps = detect(measure=False, overrides={"memory_gb": 64, "labels": {"site": "a", "rack": "3"}})
    assert caps["memory_gb"] == 512
    assert caps["labels"] == {"site": "b", "rack": "3"}
    monkeypatch.setenv(ENV_FAKE_CAPS, "{not json")
    with pytest.raises(BadRequest, match=f"{ENV_FAKE_CAPS} is not valid JSON"):
        detect(measure=False)
    monkeypatch.setenv(ENV_FAKE_CAPS, "[1, 2]")
    with pytest.raises(BadRequest, match="must hold a JSON object"):
        detect(measure=False)


def test_deep_merge_replaces_lists_and_merges_maps() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_module_prints_the_report_as_json(tmp_path: Path) -> None:
    env_caps = json.dumps({"gpus": [FAKE_GPU]})
    out = subprocess.run([sys.executable, "-m", "agent.host.capabilities", "--no-measure"], capture_output=True,
                         text=True, check=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, ENV_FAKE_CAPS: env_caps})
    caps = json.loads(out.stdout)
    assert caps["gpus"] == [FAKE_GPU]
    assert caps["kinds"] == sorted(all_kinds())


def test_a_report_without_the_feature_a_requirement_names_fails_only_that_clause() -> None:
    needs = Requirements.from_dict({"device": "cpu", "features": [UNIT_PROOFS]})
    assert needs.features == (UNIT_PROOFS,) and Requirements.from_dict(needs.to_dict()) == needs
    older = Capabilities.from_dict({"kinds": ["matmul"], "memory_gb": 8})
    assert unmet(needs, "matmul", older) == ["features"]
    assert explain(needs, "matmul", [older]) == [
        "needs agents that implement unit-proofs (a newer panal agent): 0 of 1 connected agents have it"]
    newer = Capabilities.from_dict({"kinds": ["matmul"], "features": ["other", UNIT_PROOFS]})
    assert unmet(needs, "matmul", newer) == []


@pytest.mark.parametrize("features", ["unit-proofs", [1], [""], ["x" * 65], ["f"] * 33])
def test_a_malformed_features_list_is_refused_with_its_field_named(features: object) -> None:
    with pytest.raises(ValueError, match="features: expected a list of at most 32 feature names"):
        Capabilities.from_dict({"features": features})


def test_a_missing_feature_does_not_hide_that_no_single_gpu_meets_every_gpu_clause() -> None:
    """Found in review: ``gpu`` (each GPU clause holds on some GPU, none on one GPU) was named only when no clause
    had failed at all, so an older agent's missing ``unit-proofs`` hid it: a committed GPU job's waiting line named
    only the upgrade, and after it the job still waited, for the GPU."""
    needs = Requirements.from_dict({"device": "gpu", "min_vram_gb": 16, "min_compute_capability": "8.0",
                                    "features": [UNIT_PROOFS]})
    split = Capabilities.from_dict({"kinds": ["matmul"], "gpus": [
        {"index": 0, "backend": "cuda", "vram_gb": 24, "compute_capability": "7.5"},
        {"index": 1, "backend": "cuda", "vram_gb": 8, "compute_capability": "8.6"}]})
    assert unmet(needs, "matmul", split) == ["features", "gpu"]
    assert explain(needs, "matmul", [split]) == [
        "needs agents that implement unit-proofs (a newer panal agent): 0 of 1 connected agents have it",
        "needs one GPU meeting every GPU clause: 0 of 1 connected agents have it"]
    newer = Capabilities.from_dict({**split.raw, "features": [UNIT_PROOFS]})
    assert unmet(needs, "matmul", newer) == ["gpu"]
