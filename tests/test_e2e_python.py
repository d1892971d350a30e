"""The python kind end to end: `panal submit` packs and uploads the code, a real agent runs it in its
sandbox, the results equal `panal run-local`'s (no sandbox) for the same params; a bundle altered on
the board never runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for
from test_e2e import job_view, polling

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]

TRAIN = '''
import os

import torch


def run(params, ctx):
    if params.get("marker"):
        open(params["marker"], "w").close()
    torch.manual_seed(params["seed"])
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"])
    for step in range(40):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.progress(step / 40)
    ctx.output("model", model.state_dict())
    scale = float(ctx.inputs["scale"].read_text())
    hidden = not os.path.exists(params["probe"]) if params.get("probe") else None
    return {"loss": loss.item() * scale, "weights": model.weight.flatten().tolist(), "hidden": hidden}
'''


def start_code_agent(procs: Procs, tmp: Path, url: str, name: str) -> None:
    """An agent that accepts code from this board's submitters (``--allow-code``): it runs the python
    kind in its bubblewrap sandbox, one torch thread per task (as run-local below)."""
    panal("agent", "join", url, "--name", name, "--allow-code", home=tmp / name)
    procs.start("agent", "run", "--name", name, "--threads", "1", home=tmp / name)


def write_job(tmp: Path, extra_params: str = "") -> Path:
    (tmp / "code").mkdir(parents=True, exist_ok=True)
    (tmp / "code" / "fit.py").write_text(TRAIN)
    (tmp / "scale.txt").write_text("2.0")
    path = tmp / "job.yaml"
    path.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: fit}\nspec:\n  task: python\n"
                    "  code: {path: ./code, entry: 'fit:run'}\n  inputs: {scale: ./scale.txt}\n"
                    f"  params: {{seed: 3{extra_params}}}\n  sweep: {{lr: [0.01, 0.1]}}\n"
                    "  requires: {torch: '>=2.2,<3'}\n")
    return path


def test_submitted_code_runs_on_an_agent_and_matches_run_local_exactly(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    start_code_agent(procs, tmp_path, url, "a1")
    # the code also looks for the agent's key: there for run-local (no sandbox), hidden from it on the agent
    path = write_job(tmp_path, f", probe: {str(tmp_path / 'a1' / 'agent.key')!r}")
    local = json.loads(panal("run-local", str(path), "--threads", "1", "--json", home=user, timeout=300).stdout)
    wait_for(lambda: polling(tmp_path / "a1"), "agent a1 to register and poll", timeout_s=AGENT_START_S,
             diagnose=procs.logs_text)
    sub = panal("submit", str(path), "--hub", url, "--wait", "--json", home=user, timeout=300)
    [job] = json.loads(sub.stdout)
    assert job["state"] == "succeeded", procs.logs_text()
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "-o", str(tmp_path / "out"), "--json",
                           home=user).stdout)
    assert len(res["results"]) == 2 and all(r["verified"] for r in res["results"])
    here = sorted((t["values"] for t in local["tasks"]), key=lambda v: v["loss"])
    there = sorted((r["values"] for r in res["results"]), key=lambda v: v["loss"])
    assert [v.pop("hidden") for v in here] == [False, False] and [v.pop("hidden") for v in there] == [True, True]
    # the same seed, params and thread count on a CPU: identical values, bit for bit
    assert there == here and here[0]["loss"] != here[1]["loss"]
    assert all(set(r["outputs"]) == {"model"} for r in res["results"])


def test_a_bundle_altered_on_the_board_is_refused_before_any_of_it_runs(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    marker = tmp_path / "ran"
    _, url = start_hub_proc(procs, tmp_path, user)
    path = write_job(tmp_path, f", marker: {str(marker)!r}")
    [job] = json.loads(panal("submit", str(path), "--hub", url, "--json", home=user).stdout)
    # the board's copy of the bundle (the only .tar-sized blob holding fit.py) is altered on its disk
    [blob] = [p for p in (tmp_path / "hub").rglob("*") if p.is_file() and len(p.name) == 64
              and b"fit.py" in p.read_bytes()]
    blob.write_bytes(blob.read_bytes().replace(b"torch.manual_seed", b"torch.manual_seeX"))
    start_code_agent(procs, tmp_path, url, "a1")

    def refused() -> list[dict[str, object]]:
        return [t for t in job_view(url, user, job["id"])["task_list"] if "hashes to" in str(t.get("error"))]

    wait_for(refused, "the agent to refuse the altered bundle", timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    assert not marker.exists()
