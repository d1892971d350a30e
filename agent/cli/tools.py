"""``panal demo`` and ``panal bench device|chaos|policies|dispatch|fleet|abuse|integrity|shards``: the tools in
:mod:`agent.tools`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.cli.common import PanalGroup, print_json

__all__ = ["bench", "demo"]


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo directory (.demo/) afterwards.")
def demo(keep: bool) -> None:
    """Start a hub and two agents here, submit the matmul example, print verified results."""
    from agent.tools.demo import run_demo

    raise SystemExit(run_demo(keep))


@click.group(cls=PanalGroup)
def bench() -> None:
    """Benchmarks (figures for notes; never asserted in tests)."""


@bench.command("device")
@click.option("--chart", type=click.Path(path_type=Path), default=Path("bench-device.png"), show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_device(chart: Path, repeats: int, as_json: bool) -> None:
    """Each kind on each device here (CPU vs GPU), engine overhead, warm and cold start-up; a PNG chart."""
    from agent.tools.bench_device import run_device_bench

    _print_result(run_device_bench(chart, repeats), as_json)


@bench.command("sandbox")
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--nsjail", type=click.Path(exists=True, dir_okay=False), default=None,
              help="an nsjail binary, to measure its start beside bubblewrap's")
@click.option("--json", "as_json", is_flag=True)
def bench_sandbox(repeats: int, nsjail: str | None, as_json: bool) -> None:
    """The sandbox's cost per task (a sandbox started ahead vs a warm worker), its cold start, bwrap vs nsjail."""
    from agent.tools.bench_sandbox import run_sandbox_bench

    _print_result(run_sandbox_bench(repeats, nsjail), as_json)


@bench.command("chaos")
@click.option("--minutes", type=float, default=5.0, show_default=True)
@click.option("--agents", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--store", default="sqlite", show_default=True, metavar="URL",
              help="The hub's store (hub.yaml `store`): 'sqlite' (its default file) or postgresql://USER@HOST/"
                   "EMPTY_DB, a database of the soak's own; the audit reads the figures from it.")
@click.option("--json", "as_json", is_flag=True)
def bench_chaos(minutes: float, agents: int, seed: int | None, store: str, as_json: bool) -> None:
    """A soak: random SIGKILL/SIGSTOP of agents and kill -9 of the hub under a stream of jobs; then
    checks every task was done exactly once and every signature verifies."""
    from agent.tools.bench_chaos import run_chaos_bench

    if store != "sqlite" and not store.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter(f"expected 'sqlite' or a postgresql:// URL, got {store!r}", param_hint="--store")
    _print_result(run_chaos_bench(minutes, agents, seed=seed, store="" if store == "sqlite" else store), as_json)


@bench.command("policies")
@click.option("--policy", "policies", multiple=True, help="Policies to compare (default: all).")
@click.option("--seed", type=int, default=1, show_default=True)
def bench_policies(policies: tuple[str, ...], seed: int) -> None:
    """Simulate a mixed fleet (A100s, RX 580s, GTX 1060s, laptops) under each dispatch policy."""
    from agent.tools.sim_figures import format_table
    from agent.tools.simulate import run_simulation
    from hub.dispatch import POLICIES

    click.echo(format_table(run_simulation(list(policies) or sorted(POLICIES), seed)))


@bench.command("dispatch")
@click.option("--agents", type=int, default=50, show_default=True)
@click.option("--tasks", type=int, default=10_000, show_default=True, help="Tasks of the one job (a hub takes "
              "at most 10,000 per job by default).")
@click.option("--slots", type=int, default=8, show_default=True, help="Slots per simulated agent.")
@click.option("--latency-samples", type=int, default=200, show_default=True)
@click.option("--latency-only", is_flag=True, help="Only single-task submit-to-result latency (and its steps).")
@click.option("--store", "stores", multiple=True, metavar="URL",
              help="The hub's store (hub.yaml `store`), e.g. postgresql://USER@HOST/EMPTY_DB; 'sqlite': the "
                   "default file. Repeat to compare stores in one run.  [default: sqlite]")
@click.option("--ray", "ray_python", metavar="PYTHON",
              help="Also measure Ray in the same run (benchmarks/ray_baseline.py, run by PYTHON: an interpreter "
                   "that has ray; dev-only, from a checkout) and report panal's figures as ratios to Ray's.")
@click.option("--json", "as_json", is_flag=True)
def bench_dispatch(agents: int, tasks: int, slots: int, latency_samples: int, latency_only: bool,
                   stores: tuple[str, ...], ray_python: str | None, as_json: bool) -> None:
    """A real hub (TLS, signatures) and N simulated agents running `sleep 0` tasks."""
    from agent.tools.bench_dispatch import compare_stores, ray_baseline, run_dispatch_bench, versus_ray

    urls = ["" if store == "sqlite" else store for store in stores]
    tasks = 0 if latency_only else tasks
    ray = ray_baseline(ray_python, latency_samples, tasks) if ray_python else None
    if len(urls) <= 1:
        result = run_dispatch_bench(agents, tasks, slots, latency_samples, *urls)
        if ray is not None:
            result.update(ray=ray, vs_ray=versus_ray(result, ray))
    else:
        result = compare_stores(agents, tasks, slots, latency_samples, urls)
        if ray is not None:
            for run in list(result.values()):
                run["vs_ray"] = versus_ray(run, ray)
            result["ray"] = ray
    _print_result(result, as_json)


@bench.command("fleet")
@click.option("--agents", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--idle-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="How long the fleet idles, connected, before any work.")
@click.option("--tasks", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Tasks of the one big sleep-0 job.")
@click.option("--mixed-tasks", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Tasks of each mixed-fleet job (one needs a GPU, one does not).")
@click.option("--gpu-share", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Share of agents that report a (simulated) GPU.")
@click.option("--slots", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--procs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Load processes the agents are spread over.")
@click.option("--task-s", type=click.FloatRange(0, 15), default=0.0, show_default=True,
              help="Seconds each simulated task runs, +-50% at random, so at most 22.5 s: within the hub's 30 s "
                   "lease_ttl_s, as these agents send no heartbeats (0: sleep-0 tasks saturate the hub; N: the "
                   "fleet offers about agents*slots/N tasks a second, for lease times below saturation).")
@click.option("--json", "as_json", is_flag=True)
def bench_fleet(agents: int, idle_s: float, tasks: int, mixed_tasks: int, gpu_share: float, slots: int,
                procs: int, task_s: float, as_json: bool) -> None:
    """A real hub and N light simulated agents (real TLS, signatures, long-polls): idle, a big job, a mixed fleet."""
    from agent.tools.bench_fleet import FleetSize, run_fleet_bench

    _print_result(run_fleet_bench(FleetSize(agents, idle_s, tasks, mixed_tasks, gpu_share, slots, procs, task_s)),
                  as_json)


@bench.command("abuse")
@click.option("--quick", is_flag=True, help="A small, fast run (a smoke test), not a measurement.")
@click.option("--agents", type=int, default=None, help="Honest simulated agents (default 50; quick: 5).")
@click.option("--seconds", type=float, default=None, help="Length of each phase (default 20; quick: 3).")
@click.option("--probes", default=None, metavar="NAME,...",
              help="Only these attacks (registration_flood, idle, slowloris, sse_viewers, unsigned_body_flood; "
                   "default: all at once): what each one costs the hub.")
@click.option("--open-registration", is_flag=True,
              help="Measure a hub with `registration: open` (rate-limited per address) instead of token "
                   "registration.")
@click.option("--json", "as_json", is_flag=True)
def bench_abuse(quick: bool, agents: int | None, seconds: float | None, probes: str | None,
                open_registration: bool, as_json: bool) -> None:
    """Honest throughput and lease latency while strangers flood a WAN-configured hub (registrations, idle and
    slowloris connections, status viewers, unsigned bodies), against a baseline; hub peak RSS; what each
    probe saw. The hub serves on 127.0.0.2 (token registration, per-address connection caps); each honest
    agent connects from its own loopback address, the attacker from one other."""
    import dataclasses

    from agent.tools.bench_abuse import PROBES, AbuseSize, run_abuse_bench
    size = AbuseSize.quick() if quick else AbuseSize()
    chosen = tuple(p.strip() for p in probes.split(",") if p.strip()) if probes is not None else PROBES
    unknown = sorted(set(chosen) - set(PROBES))
    if unknown or not chosen:
        raise click.BadParameter(f"expected some of {', '.join(PROBES)}, got {probes!r}", param_hint="--probes")
    size = dataclasses.replace(size, agents=agents or size.agents, seconds=seconds or size.seconds,
                               probes=chosen, open_registration=open_registration)
    _print_result(run_abuse_bench(size), as_json)


@bench.command("integrity")
@click.option("--units", type=int, default=100_000, show_default=True, help="Tasks (units) per scenario.")
@click.option("--agents", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(["mixed", "honest"]),
              help="Scenarios to run (default: both).")
@click.option("--fixed-quorum", "fixed", is_flag=True,
              help="Mixed fleet with every unit replicated (quorum 2, not adaptive), for comparison.")
@click.option("--json", "as_json", is_flag=True)
def bench_integrity(units: int, agents: int, seed: int, scenarios: tuple[str, ...], fixed: bool,
                    as_json: bool) -> None:
    """Result validation against simulated cheaters (real Board + SQLite, virtual time): wrong answers
    accepted, tasks until a cheater is caught, false rejections, compute overhead on an honest fleet."""
    from agent.tools.bench_integrity import run_integrity_bench

    _print_result(run_integrity_bench(units, agents, seed, scenarios=scenarios or ("mixed", "honest"), fixed=fixed),
                  as_json)


@bench.command("shards")
@click.option("--data-mb", type=int, default=512, show_default=True, help="Size of the data set (MiB).")
@click.option("--shards", type=int, default=16, show_default=True)
@click.option("--agents", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_shards(data_mb: int, shards: int, agents: int, as_json: bool) -> None:
    """Sharded inference on local agents: bytes each agent downloaded (counted at the hub), peak RSS per
    task, submit (split + upload) and run time. Needs about 4x the data size of free disk in TMPDIR."""
    import asyncio
    import shutil
    import tempfile

    from agent.tools.bench_shards import run_shard_bench

    work = Path(tempfile.mkdtemp(prefix="panal-shard-bench-"))
    try:
        _print_result(asyncio.run(run_shard_bench(work, data_mb, shards, agents)), as_json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for key, value in result.items():
        if isinstance(value, dict):   # one run per store (bench dispatch --store ... --store ...)
            click.echo(f"{key}:")
            for name, figure in value.items():
                click.echo(f"  {name}: {figure}")
        else:
            click.echo(f"{key}: {value}")
