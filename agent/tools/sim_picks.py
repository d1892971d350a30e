"""How long one dispatch decision takes with a big fleet and a deep queue (the real Board, its SQLite store).

``python -m agent.tools.sim_picks --agents 10000 --tasks 100000``: registers the agents (capability reports
drawn from a fleet file's hosts, by their counts), submits the tasks as signed jobs of several submitters
with mixed requirements (any device, GPU only, 12 GB, CUDA with compute capability 8.0, 20 GB, a
deadline), fills every agent through the policy itself, then measures: one agent finishes its task (a
signed result), and asks for the next; the board's dispatch timer gives the policy's time for that pick
(holdbacks included). Picks are reported as p50/p99/max in milliseconds.

What a finished task reports as its run time (``--walls``): ``measured`` (the default) is what the agent's own
speed gives for the task (the board's base prediction, +-25%), so the board's learned speeds stay near the
claims; ``slow`` is 5-60 s whatever the task, 100-1000x what the fast GPUs claim: a fleet that over-claims its
speed, where every finished agent is learned to be far slower than reported and ``fastest``/``adaptive`` must
prove many rivals for an asker almost as slow as they are (their worst case).

Only the Board's public calls are used, so the same file measures an older checkout too (run it with that
checkout first on ``PYTHONPATH``): before/after figures from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from hub.board import Board
from hub.config import HubConfig
from hub.dispatch.predict import base_seconds
from hub.sqlite_store import SqliteStore
from jobs.catalog import get_kind
from jobs.requirements import Capabilities, Requirements
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["measure_picks"]

T0 = 1_700_000_000.0
#: (requires, deadline s) per job, in turn
_MIX: list[tuple[dict[str, Any], float | None]] = [
    ({}, None), ({}, None), ({"device": "gpu"}, None), ({}, None), ({"device": "gpu", "min_vram_gb": 12}, None),
    ({"device": "gpu", "backends": ["cuda"], "min_compute_capability": "8.0"}, None), ({}, 4 * 3600.0),
    ({"device": "gpu"}, None), ({"device": "gpu", "min_vram_gb": 20}, None), ({}, None),
]


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _reports(fleet_file: Path, n: int, rng: random.Random) -> list[dict[str, Any]]:
    data = yaml.safe_load(fleet_file.read_text(encoding="utf-8"))
    gpus = data.get("gpus", {})
    hosts = data["hosts"]
    weights = [float(h.get("count", 1)) for h in hosts]
    out = []
    for host in rng.choices(hosts, weights, k=n):
        cpu = float(host.get("cpu_gflops", 200)) * rng.uniform(0.9, 1.1)
        caps: dict[str, Any] = {"memory_gb": float(host.get("memory_gb", 16)), "kinds": ["matmul"],
                                "cpu": {"cores": 8, "gflops_fp32": cpu}, "gpus": []}
        if host.get("gpu"):
            gpu = {"name": host["gpu"], **gpus[host["gpu"]]}
            gpu["gflops_fp32"] = gpu["gflops_fp32"] * rng.uniform(0.9, 1.1)   # measured: no two alike
            caps["gpus"] = [gpu]
        if host.get("window_h"):
            caps["available_until"] = T0 + 3600 * float(host["window_h"]) * rng.uniform(1, 3)
        out.append(caps)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0.0


async def _measure(policy: str, agents: int, tasks: int, jobs: int, picks: int, fleet_file: Path, seed: int,
                   directory: Path, fill: float = 1.0, walls: str = "measured") -> dict[str, Any]:
    rng = random.Random(seed)
    clock = _Clock()
    per_job = math.ceil(tasks / jobs)
    submitters = [Identity.generate() for _ in range(5)]
    config = HubConfig(dispatch_policy=policy, retry_backoff_s=0.0, expiry_interval_s=3600.0, lease_ttl_s=86400.0,
                       max_tasks_per_job=max(per_job, 10), max_tasks_per_lease=1, spot_check_share=0.0,
                       submitter_weights={s.id: float(1 + i % 3) for i, s in enumerate(submitters)})
    board = Board(SqliteStore(directory / f"{policy}.db"), config, clock)
    await board.start()
    started = time.perf_counter()
    try:
        idents = [Identity.generate() for _ in range(agents)]
        reports = _reports(fleet_file, agents, rng)
        caps_of = {ident.id: Capabilities.from_dict(caps) for ident, caps in zip(idents, reports, strict=True)}
        requires_of: dict[str, Requirements] = {}
        for i in range(0, agents, 500):
            await asyncio.gather(*(board.register_agent(ident.public, f"a{j}", Capabilities.from_dict(caps))
                                   for j, (ident, caps) in enumerate(zip(idents[i:i + 500], reports[i:i + 500],
                                                                         strict=True))))
        for j in range(jobs):
            requires, deadline = _MIX[j % len(_MIX)]
            spec: dict[str, Any] = {"task": "matmul", "params": {"size": 2048, "iterations": 50 + 10 * (j % 7)},
                                    "sweep": {"seed": list(range(per_job))}}
            if requires:
                spec["requires"] = requires
            if deadline:
                spec["policy"] = {"deadline": deadline}
            who = submitters[j % len(submitters)]
            manifest = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": f"j{j}"}, "spec": spec}
            envelope = SignedRecord.sign(who, {"manifest": manifest, "created": clock.now,
                                               "nonce": secrets.token_hex(8)}).to_wire()
            job, _ = await board.submit(envelope, who.id)
            requires_of[job.id] = Requirements.from_dict(requires)
            clock.now += 0.001
        setup_s = time.perf_counter() - started
        timings: list[float] = []
        board.time_dispatch(timings.append)
        held: dict[str, Any] = {}    # agent id -> its assignment
        order = list(range(agents))
        rng.shuffle(order)
        for i in order[:round(fill * agents)]:   # fill the fleet (or a share of it) through the policy itself
            got = await board.lease(idents[i].id, 1, 0)
            if got:
                held[idents[i].id] = got[0]
        filled = list(timings)
        timings.clear()
        busy = len(held)
        by_id = {ident.id: ident for ident in idents}
        matmul = get_kind("matmul")

        def wall_s(agent_id: str, task: Any) -> float:
            if walls == "slow":
                return rng.uniform(5, 60)
            base = base_seconds(matmul.estimate(task.params), caps_of[agent_id], requires_of[task.job_id],
                                task.params)
            return base * rng.uniform(0.8, 1.25)
        measured = taken = 0
        while measured < picks:
            clock.now += 0.05
            if held and rng.random() < 0.9:   # mostly: an agent finishes and asks again
                agent_id = rng.choice(list(held)) if len(held) < 64 else next(iter(held))
                task = held.pop(agent_id)
                payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                           "attempt": task.attempt, "agent_id": agent_id, "status": "ok",
                           "metrics": {"wall_s": wall_s(agent_id, task)}}
                await board.accept(agent_id, [SignedRecord.sign(by_id[agent_id], payload)])
            else:                             # sometimes: an idle agent asks again
                agent_id = idents[rng.randrange(agents)].id
                if agent_id in held:
                    continue
            got = await board.lease(agent_id, 1, 0)
            measured += 1
            if got:
                held[agent_id] = got[0]
                taken += 1
        return {"policy": policy, "agents": agents, "tasks": per_job * jobs, "jobs": jobs, "setup_s": setup_s,
                "fill_busy": busy, "fill_p50_ms": 1000 * _pct(filled, 0.5),
                "fill_p99_ms": 1000 * _pct(filled, 0.99), "picks": len(timings), "taken": taken,
                "p50_ms": 1000 * _pct(timings, 0.5), "p99_ms": 1000 * _pct(timings, 0.99),
                "max_ms": 1000 * max(timings, default=0.0), "walls": walls}
    finally:
        await board.stop()


def measure_picks(policies: list[str], agents: int, tasks: int, jobs: int, picks: int, fleet_file: Path,
                  seed: int = 1, fill: float = 1.0, walls: str = "measured") -> list[dict[str, Any]]:
    """One row per policy: fill-phase and steady-state pick times (ms); ``fill``: the share of agents given
    work (through the policy) before measuring."""
    async def all_of() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="panal-picks-") as directory:
            return [await _measure(p, agents, tasks, jobs, picks, fleet_file, seed, Path(directory), fill, walls)
                    for p in policies]
    return asyncio.run(all_of())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.sim_picks", description=__doc__.split("\n")[0])
    parser.add_argument("--policy", action="append")
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--picks", type=int, default=2000)
    parser.add_argument("--fleet", type=Path, default=Path("configs/sim/gaming-community.yaml"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fill", type=float, default=1.0, help="share of agents given work before measuring")
    parser.add_argument("--walls", choices=("measured", "slow"), default="measured",
                        help="what finished tasks report as their run time (see the module's docstring)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    from hub.dispatch import POLICIES
    for policy in args.policy or list(POLICIES):   # one at a time: each row is out as soon as it is measured
        [row] = measure_picks([policy], args.agents, args.tasks, args.jobs, args.picks, args.fleet, args.seed,
                              args.fill, args.walls)
        print(json.dumps({"label": args.label, **{k: round(v, 3) if isinstance(v, float) else v
                                                   for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
