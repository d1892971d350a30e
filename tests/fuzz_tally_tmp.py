"""Temporary fuzz (not committed): random fleet events, every gate vs the scan."""
from __future__ import annotations

import random
import sys
from dataclasses import replace
from typing import Any

import pytest
import test_dispatch_indexes
from test_dispatch import A100, GTX1060, WORK, cpu_caps, gpu_caps
from test_dispatch_indexes import Fleet

from hub.dispatch import members, tally
from security.records import SignedRecord

fleets = test_dispatch_indexes.fleets

REPORTS = [cpu_caps(), cpu_caps(slots=2), A100, {**A100, "slots": 2}, GTX1060, {**GTX1060, "slots": 3},
           gpu_caps("mid", 12, 9000), {**cpu_caps(), "cpu": {"cores": 8, "gflops_fp32": 400.0}},
           gpu_caps("h", 80, 60000, slots=4)]


async def fail(f: Fleet, agent: Any, task: Any) -> None:
    payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
               "attempt": task.attempt, "agent_id": agent.id, "status": "failed", "error_class": "oom",
               "error": "x"}
    await f.board.accept(agent.id, [SignedRecord.sign(agent, payload)])


@pytest.mark.parametrize("seed", range(int(sys.argv[-1]) if False else 0, 40))
@pytest.mark.parametrize("policy", ["fastest", "adaptive"])
async def test_fuzz(fleets: Any, policy: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(tally, "LOOK", rng.choice((1, 2, 64)))
    monkeypatch.setattr(tally, "LISTS_MAX", rng.choice((1, 2, 16)))
    monkeypatch.setattr(members, "FEW", rng.choice((0, 1, 16)))
    monkeypatch.setattr(members, "ROUNDS", rng.choice((1, 3, 256)))
    f: Fleet = await fleets(policy)
    import os
    if os.environ.get("NOTALLY"):
        f.board.policy.tally = None
    if rng.random() < 0.5:
        pacing = f.board._dispatcher.pacing
        pacing.config = replace(pacing.config, min_poll_interval_s=rng.choice((5.0, 20.0)))
    agents = []
    for i in range(rng.randint(3, 10)):
        caps = dict(rng.choice(REPORTS))
        if rng.random() < 0.2:
            caps["available_until"] = f.clock.now + rng.choice((10, 100, 1000))
        agents.append(await f.agent(f"v{i}", caps))
    jobs: list[str] = []

    async def submit() -> None:
        r = rng.random()
        spec: dict[str, Any] = {}
        if rng.random() < 0.3:
            spec["policy"] = {"deadline": rng.choice(("1m", "5m", "20m", "2h"))}
        if rng.random() < 0.3:
            spec["requires"] = rng.choice(({"device": "gpu"}, {"min_memory_gb": 20}, {"device": "cpu"}))
        n = rng.choice((1, 3, 10, 60, 400))
        if r < 0.5:
            jobs.append(await f.submit(n, **spec))
        elif r < 0.7:
            jobs.append(await f.submit(n, params={**WORK, "dtype": "float16"}, **spec))
        elif r < 0.85:
            jobs.append(await f.submit(n, params={**WORK, "size": rng.choice((256, 1024, 8192))}, **spec))
        else:
            jobs.append(await f.submit(n, task="sleep", params={}, sweep={"seconds": [rng.choice((1, 10, 100))] * n},
                                       **spec))

    for _ in range(rng.randint(1, 3)):
        await submit()
    held: list[tuple[Any, Any]] = []
    for step in range(100):
        ident = rng.choice(agents)
        e = rng.randrange(16)
        if e in (0, 1, 2, 3):
            for t in await f.lease(ident, rng.choice((1, 2, 4))):
                held.append((ident, t))
            if rng.random() < 0.3:
                f.board.retry_after(ident.id)
        elif e in (4, 5) and held:
            who, t = held.pop(rng.randrange(len(held)))
            f.clock.now += rng.choice((0.0, 0.5, 3.0))
            if rng.random() < 0.3:
                await fail(f, who, t)
            else:
                base = f.board.policy.predictor.leased.get(t.task_id)
                wall = (base[1] if base else 1.0) * rng.choice((0.3, 0.5, 1.0, 2.0, 10.0))
                await f.finish(who, t, wall_s=wall)
        elif e == 6:
            await submit()
        elif e == 7 and len(jobs) > 1:
            j = jobs.pop(rng.randrange(len(jobs)))
            try:
                await f.board.cancel(j, f.user.id)
            except Exception:
                pass
            held = [(w, t) for w, t in held if t.job_id != j]
        elif e == 8:
            if ident.id in f.gate.ids:
                f.gate.ids.discard(ident.id)
            else:
                f.gate.ids.add(ident.id)
        elif e == 9:
            caps = dict(rng.choice(REPORTS))
            if rng.random() < 0.2:
                caps["available_until"] = f.clock.now + rng.choice((10, 100, 1000))
            await f.agent("re", caps, identity=ident)
        elif e == 10:
            f.clock.now += rng.choice((650.0, 1300.0))
            await f.board.sweep()
            held = [(w, t) for w, t in held if (row := f.board._queues.task(t.task_id)) is not None
                    and row.lease_id == t.lease_id]
        elif e == 11 and held:
            who, t = held.pop(rng.randrange(len(held)))
            await f.board.release(who.id, t.task_id, t.lease_id)
        elif e == 12 and rng.random() < 0.3:
            f.clock.now -= rng.choice((0.5, 5.0, 100.0))
        elif e == 13:
            agents.append(await f.agent(f"n{step}", rng.choice(REPORTS)))
        else:
            f.clock.now += rng.choice((0.1, 0.7, 3.0, 40.0))
        if os.environ.get("TRACE"):
            print(step, e, ident.id[:6], f.clock.now, flush=True)
        untouched = rng.random() < 0.7
        try:
            f.check(untouched=untouched)
        except AssertionError as exc:
            dump(f, exc, step, e, untouched)
            raise


def dump(f: Fleet, exc: AssertionError, step: int, e: int, untouched: bool) -> None:
    from hub.dispatch.covers import ceil_count
    from hub.fleet import available_until
    from jobs.requirements import unmet
    print("STEP", step, "event", e, "untouched", untouched, "now", f.clock.now)
    import ast
    arg = exc.args[0]
    name, job_id, need = ast.literal_eval(arg.splitlines()[0]) if isinstance(arg, str) else arg
    agent = next(a for a in f.board.agents.values() if a.row.name == name)
    context = f.board._dispatcher.context
    queues, predictor, now = context.queues, f.board.policy.predictor, f.clock.now
    job, req = queues.job(job_id), queues.requirements(job_id)
    task = predictor.head(queues, agent, job_id, now)
    mine = predictor.predict(agent, job, task, req)
    print("asker", agent.row.id[:6], "mine", mine, "queued", queues.queued(job_id), "deadline", job.deadline_at,
          "cost", predictor.cost(job, task), task.params.get("dtype"))
    connected = f.connected()
    for b in f.board.agents.values():
        if b.row.id not in connected or unmet(req, job.kind, b.caps):
            continue
        free = predictor.free_at(b, now)
        rt = predictor.predict(b, job, task, req)
        n = ceil_count((now + mine - free) / rt - 1e-9) - 1 if free < now + mine and rt > 0 else 0
        print("  rival", b.row.id[:6], "refused", b.refused, "free", free - now, "rt", rt, "n", n,
              "until", available_until(b), "running", len(b.running), "quiet", b.quiet_until - now)
    import copy
    from hub.dispatch.fastest import SoonestGate
    policy = f.board.policy
    t = copy.deepcopy(policy.tally, {id(policy.predictor): policy.predictor})
    print("real read", policy.tally._read, "now versions", (context.presence_version(), context.slots_version(), context.noted_since(0)[0], predictor.corrections_version()), "pending", policy.tally._pending and policy.tally._pending.row.id[:6], "dirty", policy.tally._dirty, "_now", policy.tally._now - now)
    print("slots log tail", [i[:6] for i in f.board._fleet.presence.slots_log[-8:]])
    t.begin(agent)
    g = SoonestGate(context, agent, predictor, now, policy.roster, tally=t)
    print("copy says", g.share(job_id, need), "leased", {k[:6]: (v[0][:6], v[3] - now) for k, v in predictor.leased.items()})
    for key, m in t._lists.items():
        print(" list", key[1:], "live", m.live, "idle", m.idle, "waits", [(w - now, i[:6]) for w, i in m.waits],
              "windows", m.windows, "odd", m.odd, "ratio", m.ratio)
        for i, p in m.placed.items():
            print("    placed", i[:6], p[0], p[1] - now, p[2])
