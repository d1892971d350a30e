"""End to end: a row-sharded inference job on a real hub and two agents, merged back with
`panal results -o DIR --merge` into the very tensor the model gives on the whole input locally."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Procs, panal, start_hub_proc
from helpers import scaled
from safetensors.torch import load_file, save_file
from test_e2e import start_agent

from jobs.safeload import load_pt2, read_metadata

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]


def test_merged_outputs_equal_the_model_on_the_whole_input_and_agents_log_no_pt2_warning(
        tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    for name in ("a1", "a2"):
        start_agent(procs, tmp_path, url, name, "--slots", "1")
    shutil.copy(ROOT / "configs/examples/data/model.pt2", tmp_path / "model.pt2")
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))   # 3 uneven shards: 17, 17, 16 rows
    # Each shard runs as one batch (batch_size 64): CPU BLAS picks its kernel by batch size, and a 1-row
    # batch (17 = 16 + 1) differs from the whole input in the last bit; that is the model's arithmetic, not
    # the merge's, which copies bytes.
    save_file({"x": x}, str(tmp_path / "rows.safetensors"))
    manifest = tmp_path / "job.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: merged}\n"
                        "spec:\n  task: inference\n  params: {arch: export, input_key: x, batch_size: 64}\n"
                        "  inputs:\n    model: model.pt2\n"
                        "    data: {path: rows.safetensors, shard: {by: rows, count: 3}}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--wait", "--json", home=user, timeout=300).stdout)
    assert job["state"] == "succeeded" and job["n_tasks"] == 3
    out = tmp_path / "out"
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "-o", str(out), "--merge", "--json",
                           home=user).stdout)
    assert res["merged"] == {"outputs": str(out / "outputs.safetensors")}
    # each shard's file keeps its extension, and results.json says where it is
    assert all(r["outputs"]["outputs"]["path"] == f"{r['task_id']}/outputs.safetensors" for r in res["results"])
    assert all((out / r["outputs"]["outputs"]["path"]).is_file() for r in res["results"])
    merged = load_file(str(out / "outputs.safetensors"))
    torch.set_num_threads(1)
    with torch.inference_mode():
        want = load_pt2(tmp_path / "model.pt2").module()(x)
    assert merged.keys() == {"y"} and merged["y"].shape == want.shape
    assert float((merged["y"] - want).abs().max()) == 0.0
    assert read_metadata(out / "outputs.safetensors")["row_end"] == "50"
    agent_logs = "".join(p.read_text() for p in procs.logs.glob("*-agent-*.log"))
    assert "registered with" in agent_logs and "Unable to load package" not in agent_logs
