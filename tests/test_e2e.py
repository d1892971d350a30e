"""End to end, as a user runs it: `panal hub serve` and `panal agent run` as real processes over TLS."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for

from agent.client.board import BoardClient
from security.identity import Identity
from security.tls import BoardAddress

#: Each test starts a hub and agents as processes (an agent imports torch twice before it leases): on a
#: loaded machine that alone takes tens of seconds, beyond the default per-test timeout (a hang detector).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]

#: for agents that run only `sleep` tasks: their warm worker need not import torch (slow on a loaded machine)
SLEEP_ONLY = {"PANAL_WORKER_PRELOAD": "0"}


def job_view(url: str, user_home: Path, job_id: str) -> dict[str, Any]:
    """Poll through the API in-process (a CLI process per poll is too slow on a loaded machine)."""
    async def go() -> dict[str, Any]:
        async with BoardClient(BoardAddress.parse(url), Identity.load(user_home / "user.key")) as client:
            job = (await client.call("GET", f"/v1/jobs/{job_id}"))["job"]
            job["task_list"] = (await client.call("GET", f"/v1/jobs/{job_id}/tasks"))["tasks"]
            return dict(job)
    return asyncio.run(go())


def agent_id(home: Path) -> str:
    return str(Identity.load(home / "agent.key").id)


def agent_status(home: Path) -> dict[str, Any]:
    """`panal agent status --json`: what the running agent says over its control socket."""
    status: dict[str, Any] = json.loads(panal("agent", "status", "--json", home=home).stdout)
    return status


def polling(home: Path) -> bool:
    """The running agent says, over its control socket, that it has registered with its board (its lease
    loop polls from then on). `panal agent join` registers too, so the board's agent list cannot tell."""
    out = panal("agent", "status", "--json", home=home, check=False)
    boards = json.loads(out.stdout)["boards"] if out.returncode == 0 else []
    return bool(boards) and all(b["registered"] for b in boards)


def start_agent(procs: Procs, tmp: Path, url: str, name: str, *extra: str,
                home: Path | None = None, **env: str) -> subprocess.Popen[str]:
    home = home or tmp / name
    panal("agent", "join", url, "--name", name, home=home)
    # One torch thread per task: with more, torch spin-waits for busy cores and a loaded machine is 10x slower.
    return procs.start("agent", "run", "--name", name, "--threads", "1", *extra, home=home, **env)


def test_matmul_job_runs_on_two_agents_and_every_result_verifies(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    for name in ("a1", "a2"):
        start_agent(procs, tmp_path, url, name, "--slots", "1")
    # Both daemons registered: each long-polls with its one free slot, so the submission wakes both and
    # each takes one of the two tasks (one agent alone could take the second only after finishing the first).
    for name in ("a1", "a2"):
        wait_for(lambda name=name: polling(tmp_path / name), f"agent {name} to register and poll",
                 timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    sub = panal("submit", str(ROOT / "configs/examples/matmul.yaml"), "--hub", url, "--wait", "--json",
                home=user, timeout=300)
    [job] = json.loads(sub.stdout)
    assert job["n_tasks"] >= 2 and job["state"] == "succeeded" and job["tasks"] == {"done": job["n_tasks"]}
    res = panal("results", job["id"], "--hub", url, "--verify", "--json", home=user)
    index = json.loads(res.stdout)
    assert len(index["results"]) == job["n_tasks"] and all(r["verified"] for r in index["results"])
    assert all(r["metrics"]["gflops"] > 0 and len(r["values"]["digest"]) == 64 for r in index["results"])
    assert all(r["metrics"]["peak_rss_mb"] > 0 and r["environment"]["torch"] for r in index["results"])
    assert {r["agent"] for r in index["results"]} == {agent_id(tmp_path / "a1"), agent_id(tmp_path / "a2")}
    listing = json.loads(panal("jobs", "--hub", url, "--json", home=user).stdout)
    assert [j["id"] for j in listing] == [job["id"]]


def test_sigkilled_agent_task_is_requeued_and_finished_by_the_other(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    # A lease TTL well above the heartbeat period (TTL / 4), so a busy machine cannot lose a live lease.
    _, url = start_hub_proc(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="10")
    victim = start_agent(procs, tmp_path, url, "victim", **SLEEP_ONLY)
    manifest = tmp_path / "sleep.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: sleepy}\n"
                        "spec: {task: sleep, params: {seconds: 6}}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    [leased] = wait_for(lambda: [t for t in job_view(url, user, job["id"])["task_list"] if t["state"] == "leased"],
                        "the victim to lease the task", timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    assert leased["agent"] == agent_id(tmp_path / "victim")
    victim.send_signal(signal.SIGKILL)  # no goodbye, no release: only the lease TTL can tell
    victim.wait()
    start_agent(procs, tmp_path, url, "rescuer", **SLEEP_ONLY)
    wait_for(lambda: job_view(url, user, job["id"])["state"] == "succeeded", "the rescuer to finish the job",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    [task] = job_view(url, user, job["id"])["task_list"]
    assert task["attempt"] == 2  # the first attempt died with its agent
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "--json", home=user).stdout)
    [row] = res["results"]
    assert row["verified"] and row["values"] == {"slept": 6.0}
    assert row["agent"] == task["agent"] == agent_id(tmp_path / "rescuer")


def test_bad_manifest_is_reported_with_position_and_nothing_is_submitted(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: x}\nspec:\n  task: matmul\n"
                   "  params: {size: four}\n")
    out = panal("submit", str(bad), "--hub", url, home=user, check=False)
    assert out.returncode == 1
    assert "bad.yaml:6:" in out.stderr and "spec.params.size" in out.stderr and "Traceback" not in out.stderr
    assert json.loads(panal("jobs", "--hub", url, "--json", home=user).stdout) == []


def test_unauthorised_submitter_gets_403_naming_the_key(tmp_path: Path, procs: Procs) -> None:
    _, url = start_hub_proc(procs, tmp_path, tmp_path / "owner")
    stranger = tmp_path / "stranger"
    key_id = panal("keys", "show", home=stranger).stdout.strip()
    out = panal("submit", str(ROOT / "configs/examples/sleep.yaml"), "--hub", url, home=stranger, check=False)
    assert key_id.startswith("ed25519:")
    assert out.returncode == 1 and f"key {key_id} is not an authorised submitter" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_agent_is_paused_and_resumed_through_its_control_socket_mid_task(tmp_path: Path, procs: Procs) -> None:
    import psutil

    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    # A short home: the control socket lives there and unix socket paths are limited to ~104 bytes.
    home = Path(tempfile.mkdtemp(prefix="pnl-"))
    agent = start_agent(procs, tmp_path, url, "owner-machine", home=home, **SLEEP_ONLY)
    manifest = tmp_path / "sleep.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: pausable}\n"
                        "spec: {task: sleep, params: {seconds: 30}}\n")   # outlasts slow CLI calls under load
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    # The agent's own view, not the hub's "leased": the lease reply may still be on its way to the agent.
    # Progress comes from the task's worker, which starts when the work arrives.
    wait_for(lambda: [t for t in agent_status(home)["tasks"] if t["progress"] > 0], "the agent to run the task",
             timeout_s=AGENT_START_S,
             diagnose=procs.logs_text, ignore=(AssertionError,))   # its control socket may not be up yet
    panal("agent", "pause", "--reason", "owner gaming", home=home)
    status = agent_status(home)
    assert status["paused"] and "owner gaming" in status["reason"]
    assert [t["kind"] for t in status["tasks"]] == ["sleep"]
    workers = psutil.Process(agent.pid).children()
    assert workers and all(w.status() == psutil.STATUS_STOPPED for w in workers)  # suspended: no progress

    def frozen_progress_heartbeated() -> bool:
        """The paused agent keeps its lease: its heartbeats carry the progress the stopped task froze at."""
        [task] = job_view(url, user, job["id"])["task_list"]
        return bool(task["state"] == "leased" and task["progress"] == agent_status(home)["tasks"][0]["progress"] < 1)
    wait_for(frozen_progress_heartbeated, "the board to hear the paused task's progress", diagnose=procs.logs_text)
    assert job_view(url, user, job["id"])["state"] == "running"
    panal("agent", "resume", home=home)
    wait_for(lambda: job_view(url, user, job["id"])["state"] == "succeeded", "the job to finish after resume",
             diagnose=procs.logs_text)
    assert agent_status(home)["paused"] is False


def test_inference_inputs_upload_shard_and_outputs_verify(tmp_path: Path, procs: Procs) -> None:
    """Inputs are uploaded as blobs, the job is sharded into tasks, outputs come back as blobs whose
    signed digests `panal results --verify -o DIR` checks; a modified output file is detected."""
    import torch
    from safetensors.torch import load_file

    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    start_agent(procs, tmp_path, url, "gpu-less")
    example = ROOT / "configs/examples/inference.yaml"
    sub = panal("submit", str(example), "--hub", url, "--wait", "--json", home=user, timeout=300)
    [job] = json.loads(sub.stdout)
    assert job["state"] == "succeeded" and job["n_tasks"] == 2
    out = tmp_path / "out"
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "-o", str(out), "--json",
                           home=user).stdout)
    assert all(r["verified"] for r in res["results"])
    assert json.loads((out / "results.json").read_text())["job"]["id"] == job["id"]
    shards = sorted(res["results"], key=lambda r: r["task_id"])
    ys = [load_file(out / r["outputs"]["outputs"]["path"])["y"] for r in shards]
    model = torch.export.load(ROOT / "configs/examples/data/model.pt2").module()
    x = load_file(ROOT / "configs/examples/data/inputs.safetensors")["x"]
    assert torch.allclose(torch.cat(ys), model(x), atol=1e-5)
    # Tamper with one downloaded output: verification now fails, naming it.
    target = out / shards[0]["outputs"]["outputs"]["path"]
    target.write_bytes(target.read_bytes()[:-4] + b"\0\0\0\0")
    bad = panal("results", job["id"], "--hub", url, "--verify", "-o", str(out), home=user, check=False)
    assert bad.returncode == 2 and "does not match the digest the agent signed" in bad.stdout + bad.stderr


def test_panal_up_is_a_board_and_an_agent_in_one_process(procs: Procs) -> None:
    """Standalone mode: no hub, no join; `panal submit` finds the local board by itself."""
    home = Path(tempfile.mkdtemp(prefix="pnl-up-"))
    up = procs.start("up", "--port", "0", home=home)
    assert up.stdout is not None
    line = up.stdout.readline()
    assert "board at http://127.0.0.1:" in line, procs.logs_text()
    sub = panal("submit", str(ROOT / "configs/examples/sleep.yaml"), "--wait", "--json", home=home, timeout=120)
    [job] = json.loads(sub.stdout)
    assert job["state"] == "succeeded"
    res = json.loads(panal("results", job["id"], "--verify", "--json", home=home).stdout)
    assert len(res["results"]) == job["n_tasks"] and all(r["verified"] for r in res["results"])
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
    assert not (home / "local-board.url").exists()  # a stopped board is not left as the default


def test_mlp_train_resumes_on_another_agent_from_the_checkpoint_on_the_board(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="10")
    first = start_agent(procs, tmp_path, url, "first")
    manifest = tmp_path / "train.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: resumable}\n"
                        # long enough (~25 s of one core) to be running when its first checkpoint lands
                        "spec:\n  task: mlp_train\n  params: {samples: 4096, epochs: 1500, hidden_size: 256,"
                        " checkpoint_every_s: 0.5}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    wait_for(lambda: job_view(url, user, job["id"])["task_list"][0]["checkpoint"], "a checkpoint to reach the board",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    first.send_signal(signal.SIGKILL)
    first.wait()
    start_agent(procs, tmp_path, url, "second")
    wait_for(lambda: job_view(url, user, job["id"])["state"] == "succeeded", "the resumed run to finish",
             timeout_s=240, diagnose=procs.logs_text)
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "--json", home=user).stdout)
    [row] = res["results"]
    resumed = row["values"]["resumed_from"]  # where the killed agent's last checkpoint was
    assert row["verified"] and (resumed["epoch"], resumed["batch"]) > (0, 0)
    assert row["resumed_from"] == agent_id(tmp_path / "first")   # named under the second agent's signature
    assert job_view(url, user, job["id"])["task_list"][0]["attempt"] == 2
