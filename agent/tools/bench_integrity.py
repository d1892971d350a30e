"""``panal bench integrity``: how well result validation (hub/trust/) keeps wrong answers out, and what it costs.

The real Board and SQLite store (in a temporary directory) in virtual time: nothing sleeps, each
round every agent leases one task, then all of them answer (so the instances of a unit run in
parallel, as on a real fleet), then the board's clock moves on. Agents are simulated; their answers
are signed ``matmul`` results whose true values are known to the bench: honest agents add last-bit
noise (1e-7 of the scale; the fp32 bound is 1e-4), cheaters return other numbers.

Two scenarios:

- **mixed**: honest agents, an always-cheater, 10% and 1% cheaters, a lazy agent returning the
  answer of its previous task, and a colluding pair (different owners) returning the same wrong
  answer. Caught 10%-cheaters leave and new ones join, so "tasks until caught" has many samples.
  Figures: wrong answers accepted as canonical; tasks until a 10%-cheater's first invalid result;
  false rejections of honest results; units without consensus.
- **honest**: an all-honest fleet. Figure: instances run per validated unit after warm-up (the
  first ``warmup`` share of the units), i.e. the compute overhead versus no replication.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.committed import UNIT_PROOFS
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

__all__ = ["run_integrity_bench"]

T0 = 1_700_000_000.0
UNITS_PER_JOB = 1000


def truth(seed: int) -> dict[str, Any]:
    """The true answer of unit ``seed`` (what an honest agent computes, up to last-bit noise)."""
    return {"checksum": float((seed * 7919) % 2003) - 1001.0, "abs_sum": 1000.0 + seed % 17, "dtype": "float32"}


@dataclass
class Sim:
    name: str
    behaviour: str            # honest | always | rate | stale | collude
    rate: float = 0.0
    identity: Identity = field(default_factory=Identity.generate)
    results: int = 0
    caught_after: int | None = None
    last: dict[str, Any] | None = None

    def answer(self, seed: int, rng: random.Random) -> dict[str, Any]:
        right = truth(seed)
        honest = {**right, "checksum": right["checksum"] + rng.gauss(0.0, 1e-7) * right["abs_sum"],
                  "digest": hashlib.sha256(f"{seed}{rng.random()}".encode()).hexdigest()}
        if self.behaviour == "always" or (self.behaviour == "rate" and rng.random() < self.rate):
            out = {**honest, "checksum": right["checksum"] + rng.uniform(5.0, 500.0)}
        elif self.behaviour == "collude":
            out = {**honest, "checksum": right["checksum"] + 7.0, "digest": "c" * 64}
        elif self.behaviour == "stale" and self.last is not None:
            out = self.last
        else:
            out = honest
        self.last = out
        return out


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Run:
    def __init__(self, root: Path, units: int, seed: int, config: HubConfig,
                 validation: dict[str, Any] | None = None) -> None:
        self.validation = validation or {}
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.board = Board(SqliteStore(root / "board.db"), config, self.clock)
        self.board.trust.rng.seed(seed)
        self.units, self.submitted = units, 0
        self.user = Identity.generate()
        self.jobs: list[str] = []
        self.results = 0

    async def join(self, sim: Sim, n: int) -> None:
        caps = {"kinds": ["matmul"], "cpu": {"cores": 4, "gflops_fp32": 100.0}, "features": [UNIT_PROOFS]}
        await self.board.register_agent(sim.identity.public, f"{sim.name}-{n}", Capabilities.from_dict(caps),
                                        owner=f"owner-{sim.name}-{n}")   # as an admission token would set it

    async def feed(self) -> None:
        """Keep two jobs' worth of units queued until ``units`` have been submitted."""
        while self.submitted < self.units and len(self.board.view.agents) and \
                sum(self.board._queues.queued(j) for j in self.jobs[-3:]) < UNITS_PER_JOB:
            n = min(UNITS_PER_JOB, self.units - self.submitted)
            seeds = list(range(self.submitted, self.submitted + n))
            m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": f"b{len(self.jobs)}"},
                                    "spec": {"task": "matmul", "params": {"size": 64, "iterations": 1},
                                             "sweep": {"seed": seeds},
                                             "policy": {"retries": 2, **({"validation": self.validation}
                                                                         if self.validation else {})}}},
                                   max_tasks=UNITS_PER_JOB)
            job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
            self.jobs.append(job.id)
            self.submitted += n

    async def round(self, sims: list[Sim]) -> int:
        """Every agent leases one task, then every agent answers; the clock moves one virtual second."""
        await self.feed()
        order = list(sims)
        self.rng.shuffle(order)
        leased: list[tuple[Sim, Assignment]] = []
        for sim in order:
            leased += [(sim, a) for a in await self.board.lease(sim.identity.id, 1, 0)]
        self.rng.shuffle(leased)
        for sim, a in leased:
            payload = {"task_id": a.task_id, "job_id": a.job_id, "lease_id": a.lease_id, "attempt": a.attempt,
                       "agent_id": sim.identity.id, "status": "ok", "values": sim.answer(a.params["seed"], self.rng),
                       "metrics": {"wall_s": 1.0}}
            await self.board.accept(sim.identity.id, [SignedRecord.sign(sim.identity, payload)])
            sim.results += 1
        self.results += len(leased)
        self.clock.now += 1.0
        return len(leased)

    def active(self) -> bool:
        return self.submitted < self.units or len(self.board._queues) > 0

    async def canonical(self, who: dict[str, str]) -> tuple[int, int, int, dict[str, int]]:
        """(units validated, wrong answers among them, units without consensus, the wrong ones by who
        agreed on them and the quorum they needed: 1 is a trusted agent's unreplicated result)."""
        validated = wrong = none = 0
        by: Counter[str] = Counter()
        for job_id in self.jobs:
            for v in await self.board.store.get_validations(job_id):
                if v.state != "validated":
                    none += 1
                    continue
                validated += 1
                right = truth(self.jobs.index(job_id) * UNITS_PER_JOB + v.unit)
                values = v.detail.get("values") or {}
                if abs(float(values.get("checksum", 0.0)) - right["checksum"]) > 1e-4 * right["abs_sum"]:
                    wrong += 1
                    by["+".join(sorted(who.get(a, "?") for a in v.agents)) + f" (quorum {v.quorum})"] += 1
        return validated, wrong, none, dict(by)


async def _mixed(root: Path, units: int, seed: int, agents: int, fixed: bool) -> dict[str, Any]:
    config = HubConfig(validation_quorum=2, lease_ttl_s=1e9, expiry_interval_s=1e9, max_tasks_per_job=UNITS_PER_JOB)
    run = Run(root, units, seed, config, {"quorum": 2, "adaptive": False} if fixed else None)
    await run.board.start()
    cheaters = [Sim("always", "always"), Sim("stale", "stale"), Sim("collude-a", "collude"),
                Sim("collude-b", "collude"), Sim("one-percent", "rate", 0.01), Sim("one-percent", "rate", 0.01)]
    tenners = [Sim("ten-percent", "rate", 0.10) for _ in range(max(2, agents // 20))]
    honest = [Sim("honest", "honest") for _ in range(agents - len(cheaters) - len(tenners))]
    sims = honest + cheaters + tenners
    for n, sim in enumerate(sims):
        await run.join(sim, n)
    catches: list[int] = []
    retired: list[Sim] = []
    trust = run.board.trust
    started = time.perf_counter()
    joined = len(sims)
    while run.active():
        if not await run.round(sims) and run.submitted >= units and not any(
                run.board._queues.queued(j) for j in run.jobs[-3:]):
            break
        for i, sim in enumerate(sims):
            if sim.behaviour == "rate" and sim.rate == 0.10 and trust.invalid_counts.get(sim.identity.id):
                catches.append(sim.results)       # caught: it leaves, a new 10% cheater joins
                retired.append(sim)
                fresh = Sim("ten-percent", "rate", 0.10)
                sims[i] = fresh
                await run.join(fresh, joined)
                joined += 1
        if run.clock.now - T0 > 50 * units:   # a stuck board: stop rather than spin
            break
    elapsed = time.perf_counter() - started
    censored = [s.results for s in sims if s.behaviour == "rate" and s.rate == 0.10]
    who = {s.identity.id: s.name for s in sims + retired}
    validated, wrong, none, wrong_by = await run.canonical(who)
    false_rejections = sum(trust.invalid_counts.get(s.identity.id, 0) for s in honest)
    caught = sorted(catches)
    within_100 = sum(1 for c in caught if c <= 100)
    never = sum(1 for c in censored if c > 100)   # still uncaught after more than 100 tasks
    await run.board.stop()
    return {
        "agents": agents, "units": units, "replication": "fixed quorum 2" if fixed else "adaptive",
        "units_validated": validated, "units_no_consensus": none,
        "results_signed": run.results, "wrong_canonical": wrong, "wrong_canonical_by": wrong_by,
        "false_rejections_of_honest_results": false_rejections,
        "ten_percent_cheaters_caught": len(caught),
        "ten_percent_tasks_until_caught_p50": statistics.median(caught) if caught else None,
        "ten_percent_tasks_until_caught_p99": caught[min(len(caught) - 1, int(0.99 * len(caught)))] if caught else None,
        "ten_percent_caught_within_100_share": round(within_100 / (len(caught) + never), 4) if caught else None,
        "ten_percent_uncaught_after_100": never,
        "invalid_by_behaviour": dict(Counter(s.behaviour for s in cheaters
                                             for _ in range(trust.invalid_counts.get(s.identity.id, 0)))),
        "quarantined": sum(1 for s in cheaters if run.board.quarantine.quarantined(s.identity.id)),
        "stats": dict(trust.stats), "seconds": round(elapsed, 1),
        "ms_per_result": round(1000 * elapsed / max(run.results, 1), 3),
    }


async def _honest(root: Path, units: int, seed: int, agents: int, warmup: float) -> dict[str, Any]:
    config = HubConfig(validation_quorum=2, lease_ttl_s=1e9, expiry_interval_s=1e9, max_tasks_per_job=UNITS_PER_JOB)
    run = Run(root, units, seed, config)
    await run.board.start()
    sims = [Sim("honest", "honest") for _ in range(agents)]
    for n, sim in enumerate(sims):
        await run.join(sim, n)
    trust = run.board.trust
    mark: tuple[int, int] | None = None
    started = time.perf_counter()
    while run.active():
        if mark is None and trust.stats["validated"] >= warmup * units:
            mark = (run.results, trust.stats["validated"])
        if not await run.round(sims) and run.submitted >= units:
            break
    elapsed = time.perf_counter() - started
    results, validated = run.results, trust.stats["validated"]
    after = (results - mark[0]) / max(validated - mark[1], 1) if mark else None
    await run.board.stop()
    return {"agents": agents, "units": units, "results_signed": results, "units_validated": validated,
            "overall_instances_per_unit": round(results / max(validated, 1), 4),
            "overhead_after_warmup": round(after, 4) if after is not None else None,
            "warmup_units": int(warmup * units), "unreplicated": trust.stats["unreplicated"],
            "spot_checks": trust.stats["spot_checks"], "seconds": round(elapsed, 1)}


def run_integrity_bench(units: int = 100_000, agents: int = 100, seed: int = 1, warmup: float = 0.2,
                        scenarios: tuple[str, ...] = ("mixed", "honest"), fixed: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scenario in scenarios:
        with tempfile.TemporaryDirectory(prefix="panal-integrity-", dir=_fast_dir()) as tmp:
            if scenario == "mixed":
                out["mixed"] = asyncio.run(_mixed(Path(tmp), units, seed, agents, fixed))
            else:
                out["honest"] = asyncio.run(_honest(Path(tmp), units, seed, agents, warmup))
    return out


def _fast_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
