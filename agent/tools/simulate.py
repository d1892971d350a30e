"""Dispatch policies against a simulated mixed fleet: the real Board and SQLite store, virtual time.

Run ``python -m agent.tools.simulate [--policy P ...] [--seed N]`` for a table. Agents are
simulated (a capability report, a true speed that may differ from the advertised one, an error
rate, an availability window); everything else is the real thing: signed manifests go through
``Board.submit``, work through ``Board.lease`` and signed results through ``Board.accept``, on a
store in a temporary directory. Nothing sleeps: the board's clock jumps from event to event.

Figures: makespan; task turnaround (submission to accepted result) p50/p95/p99; deadline misses
(tasks of deadline jobs not done in time, or never); failed and unfinished tasks; each
submitter's share of devices while two or more submitters had queued work, and Jain's fairness
index of each submitter's received / entitled device-time, entitled being a weighted max-min fair
split of the fleet capped by its demand (1.0: everyone got its fair share); how much A100 time sat idle while
work was queued; utilisation per device class; how long each dispatch decision took (pick p50/p99).
What it runs is a scenario (``agent/tools/sim_scenario.py``: the built-in fleet; other fleets and workloads come
from fleet files, ``agent/tools/sim_fleets.py``, ``configs/sim/``); fair shares, quantiles and the table are in
``agent/tools/sim_figures.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import secrets
import tempfile
import time
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.tools.sim_figures import format_table, mean, pct, water_fill
from agent.tools.sim_scenario import BUILTIN, T0, WEIGHTS, Host, Scenario, Workload, describe
from hub.board import Board
from hub.config import HubConfig
from hub.dispatch import POLICIES
from hub.dispatch.classes import CapClass, capability_class
from hub.dispatch.predict import base_seconds
from hub.records import TaskState
from hub.sqlite_store import SqliteStore
from jobs.catalog import get_kind
from jobs.protocol import Assignment
from jobs.requirements import Capabilities, Requirements
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["run_simulation"]


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Agent:
    host: Host
    identity: Identity
    until: float | None
    order: int = 0                  # place in the fleet (agents poll in a shuffle of this order)
    busy: str | None = None         # submitter whose task it runs

    @property
    def id(self) -> str:
        return self.identity.id


async def _simulate(policy: str, seed: int, directory: Path, scenario: Scenario = BUILTIN) -> dict[str, Any]:
    rng = random.Random(seed * 7919 + 1)
    workload = scenario.workload(random.Random(seed))
    clock = _Clock()
    config = HubConfig(dispatch_policy=policy, retry_backoff_s=0.0, expiry_interval_s=3600.0,
                       submitter_weights=dict(scenario.weights), max_tasks_per_lease=1)
    board = Board(SqliteStore(directory / f"{policy}.db"), config, clock)
    await board.start()
    try:
        return await _run(board, clock, rng, workload, policy, scenario)
    finally:
        await board.stop()


async def _register(board: Board, scenario: Scenario) -> list[_Agent]:
    agents: list[_Agent] = []
    for host in scenario.hosts:
        for _ in range(host.count):
            until = T0 + host.window_h * 3600 if host.window_h else None
            agents.append(_Agent(host, Identity.generate(), until, len(agents)))

    async def one(agent: _Agent) -> None:
        caps = dict(agent.host.caps)
        if agent.until is not None:
            caps["available_until"] = agent.until
        await board.register_agent(agent.identity.public, agent.host.kind, Capabilities.from_dict(caps))

    for i in range(0, len(agents), 512):   # together: the store commits them in groups
        await asyncio.gather(*(one(agent) for agent in agents[i:i + 512]))
    return agents


async def _run(board: Board, clock: _Clock, rng: random.Random, workload: Workload, policy: str,
               scenario: Scenario = BUILTIN) -> dict[str, Any]:
    weights = scenario.weights
    agents = await _register(board, scenario)
    classes: dict[str, CapClass] = {a.id: capability_class(board.agents[a.id].caps) for a in agents}
    may_run: dict[tuple[str, str], bool] = {}
    picks: list[float] = []
    board.time_dispatch(picks.append)
    submitters = {name: Identity.generate() for name in weights}
    names = {ident.id: name for name, ident in submitters.items()}
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(at: float, what: str, data: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, what, data))

    for at, who, source in workload:
        push(T0 + at, "arrive", (who, source))
    for agent in agents:
        if agent.until is not None:
            push(agent.until, "depart", agent)
    departures = sorted(a.until for a in agents if a.until is not None)
    stay = len(agents) - len(departures)

    def runnable(agent: _Agent, waiting: list[tuple[str, Requirements, str]]) -> bool:
        """Whether the agent's class may run some queued job (else a lease would find nothing)."""
        cls = classes[agent.id]
        for job_id, req, kind in waiting:
            key = (job_id, cls.key)
            hit = may_run.get(key)
            if hit is None:
                hit = may_run[key] = cls.may_run(req, kind)
            if hit:
                return True
        return False

    arrived: dict[str, float] = {}
    deadlines: dict[str, float] = {}
    finished: dict[str, float] = {}
    total_tasks = 0
    job_ids: list[tuple[str, str]] = []
    sizes: dict[str, int] = {}
    entitled: defaultdict[str, float] = defaultdict(float)   # device-seconds a weighted max-min share gives
    received: defaultdict[str, float] = defaultdict(float)
    busy_time: defaultdict[str, float] = defaultdict(float)
    busy_kinds: Counter[str] = Counter()      # device class -> busy agents now
    running: Counter[str] = Counter()         # submitter -> busy agents now
    watched = sum(1 for a in agents if a.host.kind == scenario.watch)
    watch_idle, watch_time = 0.0, 0.0
    requirements: dict[str, Requirements] = {}
    failed_attempts = 0
    last = T0
    idle_set = {a.id: a for a in agents}

    def set_busy(agent: _Agent, who: str | None) -> None:
        if agent.busy is not None:
            running[agent.busy] -= 1
            busy_kinds[agent.host.kind] -= 1
            idle_set[agent.id] = agent
        agent.busy = who
        if who is not None:
            running[who] += 1
            busy_kinds[agent.host.kind] += 1
            idle_set.pop(agent.id, None)

    while True:
        now = clock.now
        idle = [a for a in idle_set.values() if a.until is None or a.until > now]
        idle.sort(key=lambda a: a.order)
        for agent in idle:
            board.agent(agent.id)   # seen now: waiting in a long poll
        rng.shuffle(idle)
        waiting = [(j.id, requirements.get(j.id) or Requirements.from_dict(j.requires), j.kind)
                   for j in board.view.active_jobs() if board.view.counts(j.id).get(TaskState.QUEUED.value, 0)]
        for agent in idle if waiting else ():
            if not runnable(agent, waiting):
                continue
            for assignment in await board.lease(agent.id, 1, 0):
                job = board.view.job(assignment.job_id)
                assert job is not None
                set_busy(agent, names[job.submitter_id])
                if job.id not in requirements:
                    requirements[job.id] = Requirements.from_dict(job.requires)
                push(*_attempt(agent, assignment, requirements[job.id], now, board.config.lease_ttl_s, rng))
        if not events:
            break
        at, _, what, data = heapq.heappop(events)
        # account the interval [last, at) before the clock moves
        dt = at - last
        queued: Counter[str] = Counter()
        for active in board.view.active_jobs():
            waiting_n = board.view.counts(active.id).get(TaskState.QUEUED.value, 0)
            if waiting_n and (active.deadline_at is None or active.deadline_at > last):  # takeable work
                queued[names[active.submitter_id]] += waiting_n
        demand = {who: queued[who] + running[who] for who in weights if queued[who] + running[who]}
        if len(demand) >= 2 and queued:
            present = stay + len(departures) - bisect_right(departures, last)
            for who, fair in water_fill(demand, present, weights).items():
                entitled[who] += dt * fair
                received[who] += dt * running[who]
        for kind, n in busy_kinds.items():
            busy_time[kind] += dt * n
        if watched and queued:
            watch_time += dt * watched
            watch_idle += dt * (watched - busy_kinds[scenario.watch or ""])
        clock.now = last = max(at, last)
        if what == "arrive":
            who, source = data
            envelope = SignedRecord.sign(submitters[who], {"manifest": source, "created": clock.now,
                                                           "nonce": secrets.token_hex(8)}).to_wire()
            job, _ = await board.submit(envelope, submitters[who].id)
            total_tasks += job.n_tasks
            job_ids.append((job.id, who))
            sizes[job.id] = job.n_tasks
            for i in range(job.n_tasks):
                arrived[f"{job.id}.{i}"] = clock.now
                if job.deadline_at is not None:
                    deadlines[f"{job.id}.{i}"] = job.deadline_at
        elif what == "result":
            agent, assignment, ok, wall = data
            set_busy(agent, None)
            payload = {"task_id": assignment.task_id, "job_id": assignment.job_id,
                       "lease_id": assignment.lease_id, "attempt": assignment.attempt, "agent_id": agent.id,
                       "status": "ok" if ok else "failed", "metrics": {"wall_s": wall}}
            if not ok:
                failed_attempts += 1
                payload.update(error_class="device_lost", error="simulated: the device fell off the bus")
            await board.accept(agent.id, [SignedRecord.sign(agent.identity, payload)])
            if ok:
                finished[assignment.task_id] = clock.now
        elif what == "lost":
            set_busy(data, None)
            await board.sweep()
        # "depart": nothing to do but poll again (others may now be needed)

    end = max(finished.values(), default=T0)
    turnaround = [(finished[t] - arrived[t]) / 60 for t in finished]
    job_times: defaultdict[str, list[float]] = defaultdict(list)
    for job_id, who in job_ids:
        ends = [finished.get(f"{job_id}.{i}") for i in range(sizes[job_id])]
        if all(e is not None for e in ends):
            job_times[who].append((max(e for e in ends if e is not None) - arrived[f"{job_id}.0"]) / 60)
    misses = sum(1 for t, d in deadlines.items() if finished.get(t, math.inf) > d)
    xs = [min(received[who] / entitled[who], 1.0) for who in weights if entitled[who] > 0]
    jain = sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs else 1.0
    total_dev = sum(received.values()) or 1.0
    per_class = Counter(agent.host.kind for agent in agents)
    failed = 0
    for job_id, _ in job_ids:
        failed += sum(1 for t in await board.store.get_tasks(job_id) if t.state == TaskState.FAILED)
    return {
        "policy": policy,
        "scenario": scenario.name,
        "agents": len(agents),
        "tasks": total_tasks,
        "done": len(finished),
        "failed": failed,
        "unfinished": total_tasks - len(finished),
        "failed_attempts": failed_attempts,
        "makespan_h": (end - T0) / 3600,
        "p50_min": pct(turnaround, 0.50),
        "p95_min": pct(turnaround, 0.95),
        "p99_min": pct(turnaround, 0.99),
        "deadline_tasks": len(deadlines),
        "deadline_misses": misses,
        "share": {who: received[who] / total_dev for who in weights},
        "fair_ratio": {who: received[who] / entitled[who] if entitled[who] else math.nan for who in weights},
        "jain": jain,
        "job_mean_min": {who: mean(job_times[who]) for who in weights},
        "watch": scenario.watch,
        "a100_idle_pct": 100 * watch_idle / watch_time if watch_time else 0.0,
        "utilisation_pct": {kind: 100 * busy_time[kind] / ((end - T0) * n) if end > T0 else 0.0
                            for kind, n in per_class.items()},
        "picks": len(picks),
        "pick_p50_ms": 1000 * pct(picks, 0.50),
        "pick_p99_ms": 1000 * pct(picks, 0.99),
    }


def _attempt(agent: _Agent, assignment: Assignment, req: Requirements, now: float, lease_ttl_s: float,
             rng: random.Random) -> tuple[float, str, Any]:
    """The event that ends this attempt: a result, or (the agent left mid-task) a lease expiry."""
    host = agent.host
    cost = get_kind(assignment.kind).estimate(assignment.params)
    caps = Capabilities.from_dict(host.caps)
    wall = base_seconds(cost, caps, req, assignment.params) / host.true_speed * rng.lognormvariate(0, 0.15)
    ok = rng.random() >= host.error_rate
    if not ok:
        wall *= rng.uniform(0.1, 1.0)
    if agent.until is not None and now + wall > agent.until:
        return agent.until + lease_ttl_s + 1e-3, "lost", agent
    return now + wall, "result", (agent, assignment, ok, wall)


def run_simulation(policies: list[str], seed: int, scenario: Scenario = BUILTIN) -> list[dict[str, Any]]:
    """Simulate each policy on the same fleet and workload; one dict of figures per policy."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown dispatch policy {', '.join(unknown)} (known: {', '.join(POLICIES)})")

    async def all_of() -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="panal-sim-") as directory:
            out = []
            for policy in policies:
                started = time.perf_counter()
                row = await _simulate(policy, seed, Path(directory), scenario)
                out.append({**row, "wall_s": time.perf_counter() - started})
            return out

    return asyncio.run(all_of())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES), help="repeat; default: all")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rows = run_simulation(args.policy or list(POLICIES), args.seed)
    print(format_table(rows))
    print(f"\nfleet: {describe(BUILTIN)}\nweights: {WEIGHTS}; seed {args.seed}")
    print("utilisation %: " + "; ".join(
        f"{r['policy']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["utilisation_pct"].items()) for r in rows))


if __name__ == "__main__":
    main()
