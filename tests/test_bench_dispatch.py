"""``panal bench dispatch --latency-only``: single-task round trips and where their time went, no throughput phase."""

from __future__ import annotations

from agent.tools.bench_dispatch import run_dispatch_bench


def test_latency_only_reports_the_steps_of_each_single_task_round_trip() -> None:
    report = run_dispatch_bench(agents=1, tasks=0, slots=1, samples=5)
    assert {"latency_ms_p50", "latency_ms_p99"} <= set(report)
    assert set(report["latency_steps_ms_p50"]) == {"submit", "to_lease", "to_done"}
    assert all(ms >= 0 for ms in report["latency_steps_ms_p50"].values())
    assert "tasks_per_s" not in report      # the throughput phase did not run
