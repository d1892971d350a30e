"""What the dispatch simulator runs: a fleet of hosts, its submitters' weights and the work they send.

Why its own module: a scenario is data the simulator (agent/tools/simulate.py) replays and fleet files
(agent/tools/sim_fleets.py, ``configs/sim/``) produce, so both depend on it and neither on the other; the built-in
mixed fleet (a university lab's A100s beside volunteers' GPUs and laptops, some flaky, some leaving early) is the
default scenario and the one the tests pin.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILTIN", "FLEET", "T0", "WEIGHTS", "Host", "Scenario", "Workload", "builtin_workload", "describe"]

#: the simulated clock's start (the board's time in seconds)
T0 = 1_700_000_000.0
#: the built-in fleet's submitters and their fair-share weights
WEIGHTS = {"lab": 1.0, "infer": 1.0, "bigmodel": 2.0}
#: (arrival s after the start, submitter, manifest)
Workload = list[tuple[float, str, dict[str, Any]]]


@dataclass(frozen=True)
class Host:
    kind: str                       # device class, for utilisation figures
    count: int
    caps: dict[str, Any]
    true_speed: float = 1.0         # actual / advertised speed (a card that throttles when hot: < 1)
    error_rate: float = 0.0         # chance an attempt fails (device lost)
    window_h: float | None = None   # leaves for the day after this long


def _gpu(name: str, backend: str, vram_gb: float, cc: str | None, fp32: float, fp16: float,
         bandwidth: float) -> dict[str, Any]:
    return {"name": name, "backend": backend, "vram_gb": vram_gb, "compute_capability": cc,
            "gflops_fp32": fp32, "gflops_fp16": fp16, "memory_bandwidth_gbps": bandwidth}


def _caps(gpus: Sequence[dict[str, Any]] = (), cpu_gflops: float = 200.0, memory_gb: float = 16.0) -> dict[str, Any]:
    return {"memory_gb": memory_gb, "kinds": ["matmul"], "gpus": list(gpus),
            "cpu": {"cores": 4, "gflops_fp32": cpu_gflops, "memory_bandwidth_gbps": 25.0}}


_A100 = _gpu("NVIDIA A100-SXM4-40GB", "cuda", 40, "8.0", 19_500, 78_000, 1555)
_RX580 = _gpu("Radeon RX 580", "rocm", 8, None, 6_100, 6_100, 256)
_GTX1060 = _gpu("GeForce GTX 1060 6GB", "cuda", 6, "6.1", 4_400, 70, 192)

#: a university lab, a few A100s, and volunteers' laptops - some flaky, some leaving early
FLEET: tuple[Host, ...] = (
    Host("A100", 2, _caps([_A100], 800, 256)),
    Host("RX 580", 4, _caps([_RX580], 150)),
    Host("RX 580", 2, _caps([_RX580], 150), window_h=1.5),
    Host("GTX 1060", 5, _caps([_GTX1060], 150)),
    Host("GTX 1060", 1, _caps([_GTX1060], 150), true_speed=0.35),
    Host("laptop CPU", 5, _caps()),
    Host("laptop CPU", 2, _caps(), error_rate=0.5),
    Host("RX 580", 1, _caps([_RX580], 150), error_rate=0.6),
)


def builtin_workload(rng: random.Random) -> Workload:
    """(arrival, submitter, manifest): bulk training sweeps, deadline inference, a few 40 GB jobs."""
    out: list[tuple[float, str, dict[str, Any]]] = []

    def job(at: float, who: str, name: str, params: dict[str, Any], n: int, requires: dict[str, Any] | None = None,
            deadline_s: float | None = None) -> None:
        spec: dict[str, Any] = {"task": "matmul", "params": params, "sweep": {"seed": list(range(n))}}
        if requires:
            spec["requires"] = requires
        if deadline_s:
            spec["policy"] = {"deadline": deadline_s}
        out.append((at, who, {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}))

    for i in range(15):   # a big backlog at once: ~5 min per task on a GTX 1060, ~1.8 h on a laptop
        job(rng.uniform(0, 600), "lab", f"train-{i}", {"size": 8192, "iterations": 1200}, 20)
    for i in range(20):   # ~1 min per task on a mid GPU; must be done within 15 minutes of submission
        job(rng.uniform(0, 7200), "infer", f"infer-{i}", {"size": 4096, "iterations": 2000, "dtype": "float16"}, 8,
            deadline_s=900)
    for i in range(3):    # only an A100 has the memory
        job(rng.uniform(0, 7200), "bigmodel", f"big-{i}", {"size": 16384, "iterations": 1000, "dtype": "float16"},
            6, requires={"device": "gpu", "min_vram_gb": 32})
    for i in range(2):
        job(rng.uniform(0, 7200), "bigmodel", f"probe-{i}", {"size": 4096, "iterations": 200}, 8)
    return sorted(out, key=lambda item: item[0])


@dataclass(frozen=True)
class Scenario:
    """A fleet, its submitters' weights and the work they send (a fleet file: ``agent/tools/sim_fleets.py``)."""

    name: str
    hosts: tuple[Host, ...]
    weights: Mapping[str, float]
    workload: Callable[[random.Random], Workload]
    watch: str | None = None          # a device class whose idle time (while work waits) is reported


BUILTIN = Scenario("built-in mixed fleet", FLEET, WEIGHTS, builtin_workload, "A100")


def describe(scenario: Scenario) -> str:
    """The fleet in one line: count x class, with how its hosts misbehave."""
    return ", ".join(f"{h.count} x {h.kind}" + (" (throttled)" if h.true_speed < 1 else "")
                     + (" (flaky)" if h.error_rate else "") + (f" (leaves at {h.window_h:g} h)" if h.window_h else "")
                     for h in scenario.hosts if h.count)
