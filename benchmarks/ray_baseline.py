"""Ray's figures for what `panal bench dispatch` measures, to compare in the same run (dev-only).

Ray is no dependency of panal: run this with an interpreter that has it, e.g. a venv of its own
(`python3 -m venv /tmp/ray && /tmp/ray/bin/pip install ray`); `panal bench dispatch --ray /tmp/ray/bin/python`
runs it before panal's own measurement and reports both, with the ratios.

    /tmp/ray/bin/python benchmarks/ray_baseline.py --samples 200 --tasks 10000

Prints one JSON object: single-task submit -> result latency (``ray.get(f.remote())`` of a ``sleep 0`` task,
p50/p99, in ms) and throughput (``--tasks`` such tasks submitted at once and drained, tasks/s). Ray runs
locally with as many worker CPUs as this machine has (``--cpus``), its workers warmed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ray


@ray.remote
def sleep0(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=10_000, help="0: latency only")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    try:
        ray.get([sleep0.remote(0.0) for _ in range(50)])   # start and warm the workers
        latencies = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            ray.get(sleep0.remote(0.0))
            latencies.append((time.perf_counter() - t0) * 1000)
        latencies.sort()
        out: dict[str, float] = {"latency_ms_p50": round(statistics.median(latencies), 2),
                                 "latency_ms_p99": round(latencies[min(len(latencies) - 1,
                                                                       int(len(latencies) * 0.99))], 2)}
        if args.tasks > 0:
            t0 = time.perf_counter()
            ray.get([sleep0.remote(0.0) for _ in range(args.tasks)])
            out["tasks_per_s"] = round(args.tasks / (time.perf_counter() - t0), 1)
    finally:
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
