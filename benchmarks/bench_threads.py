"""Small-model throughput by torch thread count: a local loop, a warm worker, and a whole agent.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_threads.py [--threads 1,2] [--tasks 4] [--epochs 10]``
measures one small ``mlp_train`` task (the kind's defaults: 16-64-4 MLP, 1024 samples, batch 64) three
ways for each thread count, so a slowdown can be placed:

- ``local``: the kind run in this process (no worker, no agent): the kernel throughput;
- ``worker``: the same task in a real warm worker process (``agent/engine/runner.py``): adds the
  pipe and the worker's limits;
- ``agent``: a job of ``--tasks`` such tasks submitted to ``panal hub serve`` and run by
  ``panal agent run --slots 1 --threads N``: adds leasing, inputs, signing, uploading weights and
  results. ``task_wall_s`` is the median wall time inside the worker (its ``wall_s``); ``per_task_s`` the
  job's wall time divided by its tasks (what a submitter sees).

Output: one JSON object; ``samples_per_s`` is the kind's own metric (training steps only). Numbers depend
on the machine and its load: compare within one run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _params(epochs: int, seed: int = 0) -> dict[str, Any]:
    return {"epochs": epochs, "seed": seed}


def local(threads: int, epochs: int, repeats: int, tmp: Path) -> dict[str, float]:
    """The kind's own code in this process, like a volunteer's single-thread loop."""
    import torch

    from agent.engine.worker import run_task

    torch.set_num_threads(threads)
    rates, walls = [], []
    for i in range(repeats):
        started = time.perf_counter()
        reply = run_task({"kind": "mlp_train", "params": _params(epochs, i), "workdir": str(tmp / f"l{threads}-{i}"),
                          "threads": threads}, io.BytesIO())
        walls.append(time.perf_counter() - started)
        rates.append(float(reply["metrics"]["samples_per_s"]))
    return {"samples_per_s": round(statistics.median(rates)), "task_wall_s": round(statistics.median(walls), 3)}


async def _worker(threads: int, epochs: int, repeats: int, tmp: Path) -> dict[str, float]:
    from agent.engine.runner import TaskRequest, Worker

    worker = Worker()
    await worker.start()
    try:
        rates, walls = [], []
        for i in range(repeats):
            started = time.perf_counter()
            outcome = await worker.run(TaskRequest(kind="mlp_train", params=_params(epochs, i), timeout_s=600,
                                                   workdir=str(tmp / f"w{threads}-{i}"), threads=threads))
            walls.append(time.perf_counter() - started)
            rates.append(float(outcome.metrics["samples_per_s"]))
    finally:
        await worker.close()
    return {"samples_per_s": round(statistics.median(rates)), "task_wall_s": round(statistics.median(walls), 3)}


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", "PANAL_LAN_ENABLED": "false"}


def _panal(home: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "agent", *args], env=_env(home), text=True, capture_output=True,
                          timeout=900, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"panal {' '.join(args)} failed: {done.stdout}\n{done.stderr}")
    return done.stdout


def _polling(home: Path) -> bool:
    done = subprocess.run([sys.executable, "-m", "agent", "agent", "status", "--json"], env=_env(home), text=True,
                          capture_output=True, cwd=ROOT, check=False)
    boards: list[dict[str, Any]] = json.loads(done.stdout).get("boards") or [] if done.returncode == 0 else []
    return bool(boards) and all(b.get("registered") for b in boards)


def agent(threads: int, epochs: int, tasks: int, tmp: Path, url: str, user: Path) -> dict[str, float]:
    home = tmp / f"agent-{threads}"
    _panal(home, "agent", "join", url)
    (home / "prefs.yaml").write_text("pause_on_battery: false\n")
    log = open(tmp / f"agent-{threads}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "agent", "agent", "run", "--slots", "1", "--threads", str(threads)],
                            env=_env(home), stdout=log, stderr=log, cwd=ROOT)
    log.close()
    try:
        deadline = time.monotonic() + 300
        while not _polling(home):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"agent did not start: {(tmp / f'agent-{threads}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        manifest = tmp / f"job-{threads}.yaml"
        seeds = ", ".join(str(s) for s in range(tasks))
        manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: threads}\n"
                            f"spec:\n  task: mlp_train\n  params: {{epochs: {epochs}}}\n  sweep: {{seed: [{seeds}]}}\n")
        started = time.perf_counter()
        [job] = json.loads(_panal(user, "submit", str(manifest), "--hub", url, "--wait", "--json"))
        wall = time.perf_counter() - started
        results = json.loads(_panal(user, "results", job["id"], "--hub", url, "--json"))["results"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    rates = [float(r["metrics"]["samples_per_s"]) for r in results]
    walls = [float(r["metrics"]["wall_s"]) for r in results]
    return {"samples_per_s": round(statistics.median(rates)), "task_wall_s": round(statistics.median(walls), 3),
            "slowest_task_wall_s": round(max(walls), 3), "per_task_s": round(wall / len(results), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default=f"1,2,{os.cpu_count() or 1}")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-agent", action="store_true", help="Skip the whole-agent measurement.")
    args = parser.parse_args(argv)
    counts = sorted({int(t) for t in args.threads.split(",")})
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_1m": os.getloadavg()[0], "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="panal-threads-") as text:
        tmp = Path(text)
        for t in counts:
            report[f"local_t{t}"] = local(t, args.epochs, args.repeats, tmp)
            report[f"worker_t{t}"] = asyncio.run(_worker(t, args.epochs, args.repeats, tmp))
        if not args.no_agent:
            user = tmp / "user"
            _panal(user, "hub", "init", "--dir", str(tmp / "hub"))
            hub = subprocess.Popen([sys.executable, "-m", "agent", "hub", "serve", "--dir", str(tmp / "hub"),
                                    "--port", "0", "--bind", "127.0.0.1"], env=_env(user), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                assert hub.stdout is not None
                url = hub.stdout.readline().split("serving at", 1)[1].strip()
                for t in counts:
                    report[f"agent_t{t}"] = agent(t, args.epochs, args.tasks, tmp, url, user)
            finally:
                hub.send_signal(signal.SIGTERM)
                hub.wait(timeout=60)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
