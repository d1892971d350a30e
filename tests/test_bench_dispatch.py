"""``panal bench dispatch --latency-only``: single-task round trips and where their time went, no throughput phase;
``--ray PYTHON``: Ray's figures from the same run, as ratios."""

from __future__ import annotations

import sys

import click
import pytest

from agent.tools.bench_dispatch import ray_baseline, run_dispatch_bench, versus_ray


def test_latency_only_reports_the_steps_of_each_single_task_round_trip() -> None:
    report = run_dispatch_bench(agents=1, tasks=0, slots=1, samples=5)
    # one request (POST /v1/jobs?wait=) and, in turn, submit then a waiting GET
    assert {"latency_ms_p50", "latency_ms_p99", "two_requests_latency_ms_p50"} <= set(report)
    assert set(report["latency_steps_ms_p50"]) == {"to_lease", "to_done"}
    assert set(report["two_requests_latency_steps_ms_p50"]) == {"submit", "to_lease", "to_done"}
    assert all(ms >= 0 for ms in report["latency_steps_ms_p50"].values())
    assert "tasks_per_s" not in report      # the throughput phase did not run


def test_figures_compare_to_rays_as_ratios() -> None:
    panal = {"latency_ms_p50": 3.0, "tasks_per_s": 3000.0}
    assert versus_ray(panal, {"latency_ms_p50": 1.5, "tasks_per_s": 1500.0}) == {"latency_p50_x_ray": 2.0,
                                                                                  "tasks_per_s_x_ray": 2.0}
    assert versus_ray({"latency_ms_p50": 3.0}, {"latency_ms_p50": 2.0}) == {"latency_p50_x_ray": 1.5}


def test_an_interpreter_without_ray_is_a_clear_error() -> None:
    with pytest.raises(click.ClickException, match="that interpreter has no ray"):
        ray_baseline(sys.executable, 5, 0)     # this project's interpreter: ray is never one of its dependencies
    with pytest.raises(click.ClickException, match="cannot run it"):
        ray_baseline("/nonexistent/python", 5, 0)
