"""The simulator's figures: fair shares, quantiles, and the table ``panal hub sim`` prints.

Why its own module: what "fair" means (a weighted max-min split of the fleet among the submitters with queued
work, each capped by its demand; Jain's index over received / entitled device-time) and how the results read
are judged apart from how the simulation runs (agent/tools/simulate.py), and are easier to check that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.tools.sim_scenario import WEIGHTS

__all__ = ["format_table", "mean", "pct", "water_fill"]


def water_fill(demand: dict[str, int], devices: int, weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted max-min fair split of ``devices`` among submitters, none above its demand."""
    fair: dict[str, float] = {}
    left, open_ = float(devices), dict(demand)
    while open_ and left > 1e-9:
        total_w = sum(weights[w] for w in open_)
        capped = {w: d for w, d in open_.items() if d - fair.get(w, 0.0) <= left * weights[w] / total_w}
        if not capped:
            for w in open_:
                fair[w] = fair.get(w, 0.0) + left * weights[w] / total_w
            break
        for w, d in capped.items():
            left -= d - fair.get(w, 0.0)
            fair[w] = float(d)
            del open_[w]
    return fair


def mean(values: list[float]) -> float:
    """The mean (NaN for none: no job of that submitter finished)."""
    return sum(values) / len(values) if values else math.nan


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank method (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the figures (what ``python -m agent.tools.simulate`` prints)."""
    who = list(rows[0]["share"]) if rows else list(WEIGHTS)
    short = "/".join(w[:5] for w in who)
    watch = rows[0].get("watch") if rows else "A100"
    head = ["policy", "makespan h", "p50 min", "p95 min", "p99 min", "deadline misses", "failed attempts",
            "Jain", f"share {short} %", f"job mean min {short}", f"{watch or '-'} idle %", "pick p50/p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = "/".join(f"{100 * r['share'][w]:.0f}" for w in who)
        jobs = "/".join(f"{r['job_mean_min'][w]:.0f}" for w in who)
        lines.append(f"| {r['policy']} | {r['makespan_h']:.2f} | {r['p50_min']:.1f} | {r['p95_min']:.1f} | "
                     f"{r['p99_min']:.1f} | {r['deadline_misses']}/{r['deadline_tasks']} | "
                     f"{r['failed_attempts']} | {r['jain']:.3f} | {share} | {jobs} | {r['a100_idle_pct']:.0f} | "
                     f"{r['pick_p50_ms']:.2f}/{r['pick_p99_ms']:.2f} |")
    return "\n".join(lines)
