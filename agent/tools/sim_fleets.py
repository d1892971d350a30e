"""Fleet files for the dispatch simulator (``configs/sim/*.yaml``, ``panal hub sim --fleet FILE``).

A fleet file names the hosts (device classes: how many, their capability report, how they behave) and the
work submitted to them (bulk sweeps, deadline jobs, jobs only some hosts can run), so a hub operator can
ask "which policy for *my* fleet" without editing code::

    name: a university lab
    weights: {thesis: 1, course: 2}          # submitter -> fair-share weight
    watch: GTX 1080 Ti                        # the device class whose idle time is reported
    gpus:                                     # named GPU reports, used by hosts below
      1080ti: {backend: cuda, vram_gb: 11, compute_capability: "6.1", gflops_fp32: 11300,
               gflops_fp16: 170, memory_bandwidth_gbps: 484}
    hosts:
      - {kind: GTX 1080 Ti, count: 8, gpu: 1080ti, cpu_gflops: 300, memory_gb: 32}
      - {kind: GTX 1080 Ti, count: 1, gpu: 1080ti, error_rate: 0.4}     # a flaky node
      - {kind: laptop CPU, count: 4, window_h: 2, true_speed: 0.5}
    workload:
      - {submitter: thesis, jobs: 10, tasks: 20, within_s: 600, params: {size: 8192, iterations: 1200}}
      - {submitter: course, jobs: 12, tasks: 8, within_s: 7200, deadline_s: 900,
         params: {size: 4096, iterations: 2000, dtype: float16}, requires: {device: gpu}}

``--scale F`` multiplies host counts and job counts (a 10,000-GPU community at 0.1 is 1,000 GPUs with a
tenth of the work: the same shape, minutes instead of hours on a laptop).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.tools.sim_scenario import Host, Scenario, Workload

__all__ = ["FleetFileError", "load_scenario"]


class FleetFileError(ValueError):
    """A fleet file that cannot be simulated; the message names the place."""


def _need(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FleetFileError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _host(item: Any, gpus: Mapping[str, Any], scale: float, where: str) -> Host:
    item = _need(item, dict, where)
    count = _need(item.get("count", 1), int, f"{where}.count")
    caps: dict[str, Any] = {
        "memory_gb": float(_need(item.get("memory_gb", 16), (int, float), f"{where}.memory_gb")),
        "kinds": list(item.get("kinds", ["matmul"])),
        "cpu": {"cores": 4, "gflops_fp32": float(_need(item.get("cpu_gflops", 200), (int, float),
                                                          f"{where}.cpu_gflops")),
                "memory_bandwidth_gbps": 25.0},
        "gpus": [],
    }
    gpu = item.get("gpu")
    if gpu is not None:
        if gpu not in gpus:
            raise FleetFileError(f"{where}.gpu: no GPU named {gpu!r} under gpus (known: {', '.join(gpus)})")
        caps["gpus"] = [{"name": str(gpu), **gpus[gpu]}]
    if item.get("labels"):
        caps["labels"] = dict(_need(item["labels"], dict, f"{where}.labels"))
    window = item.get("window_h")
    return Host(str(item.get("kind", gpu or "CPU")), max(0, round(count * scale)), caps,
                float(item.get("true_speed", 1.0)), float(item.get("error_rate", 0.0)),
                float(window) if window is not None else None)


def _workload(items: list[Any], scale: float) -> Callable[[random.Random], Workload]:
    for i, item in enumerate(items):
        _need(item, dict, f"workload[{i}]")
        _need(item.get("submitter"), str, f"workload[{i}].submitter")
        _need(item.get("params", {}), dict, f"workload[{i}].params")

    def generate(rng: random.Random) -> Workload:
        out: Workload = []
        for i, item in enumerate(items):
            jobs = max(1, round(int(item.get("jobs", 1)) * scale))
            for j in range(jobs):
                spec: dict[str, Any] = {"task": str(item.get("kind", "matmul")), "params": dict(item.get("params", {})),
                                        "sweep": {"seed": list(range(int(item.get("tasks", 1))))}}
                if item.get("requires"):
                    spec["requires"] = dict(item["requires"])
                if item.get("deadline_s"):
                    spec["policy"] = {"deadline": float(item["deadline_s"])}
                at = rng.uniform(float(item.get("from_s", 0.0)), float(item.get("within_s", 0.0)))
                name = f"{item.get('name', item['submitter'])}-{i}-{j}"
                out.append((at, item["submitter"], {"apiVersion": "panal/v1", "kind": "Job",
                                                     "metadata": {"name": name}, "spec": spec}))
        return sorted(out, key=lambda entry: entry[0])
    return generate


def load_scenario(path: Path, scale: float = 1.0) -> Scenario:
    """Read a fleet file; :class:`FleetFileError` names what is wrong and where."""
    if not math.isfinite(scale) or scale <= 0:
        raise FleetFileError(f"scale must be above 0, got {scale}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FleetFileError(f"{path}: {exc}") from exc
    data = _need(data, dict, str(path))
    gpus = _need(data.get("gpus", {}), dict, "gpus")
    hosts = tuple(_host(item, gpus, scale, f"hosts[{i}]")
                  for i, item in enumerate(_need(data.get("hosts"), list, "hosts")))
    workload = _need(data.get("workload"), list, "workload")
    submitters = {item["submitter"] for item in workload if isinstance(item, dict) and "submitter" in item}
    weights = {str(k): float(v) for k, v in _need(data.get("weights", {}), dict, "weights").items()}
    weights = {who: weights.get(who, 1.0) for who in sorted(submitters)}
    if not any(h.count for h in hosts):
        raise FleetFileError("hosts: no host left at this scale")
    return Scenario(str(data.get("name", path.stem)), hosts, weights, _workload(workload, scale),
                    str(data["watch"]) if data.get("watch") else None)
