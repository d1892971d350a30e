"""``panal bench fleet`` in a small configuration: a real hub, real load processes, every phase. Outcomes only
(every task leased exactly once, jobs done, GPU work only on GPU agents, every figure reported), never timing."""

from __future__ import annotations

import pytest

from agent.tools.bench_fleet import FleetSize, run_fleet_bench


def test_fleet_bench_runs_every_phase_and_does_each_task_once() -> None:
    size = FleetSize(agents=8, idle_s=0.5, tasks=300, mixed_tasks=100, gpu_share=0.25, slots=2, procs=2)
    report = run_fleet_bench(size)

    assert report["agent_errors"] == []
    assert report["drain"]["state"] == "succeeded"
    assert report["mixed"]["states"] == ["succeeded", "succeeded"]
    assert report["tasks_leased"] == size.tasks + 2 * size.mixed_tasks
    assert report["tasks_leased_twice"] == 0
    assert report["gpu_tasks_on_cpu_agents"] == 0
    for field in ("hub_cpu_share_of_core", "hub_rss_mb", "hub_rss_kb_per_agent"):
        assert isinstance(report["idle"][field], float | int), field
    for phase in ("drain", "mixed"):
        for field in ("seconds", "tasks_per_s", "hub_cpu_ms_per_task", "wakeups_per_task",
                      "agent_lease_round_trip_ms_p50", "agent_lease_round_trip_ms_p99",
                      "hub_lease_service_ms_p50", "hub_lease_service_ms_p99"):
            assert isinstance(report[phase][field], float | int), (phase, field)
        assert report[phase]["hub_leases_served"] > 0, phase
    assert {"notes", "load_before", "load_after", "hub_rss_mb_no_agents", "hub_rss_mb_end",
            "register_seconds"} <= set(report)


def test_fleet_bench_with_a_task_run_time_still_does_each_task_once() -> None:
    """``--task-s``: agents hold their tasks a while (a load below saturation); every task still runs once."""
    size = FleetSize(agents=4, idle_s=0.1, tasks=40, mixed_tasks=8, slots=2, procs=1, task_s=0.05)
    report = run_fleet_bench(size)
    assert report["agent_errors"] == []
    assert report["tasks_leased"] == size.tasks + 2 * size.mixed_tasks
    assert report["tasks_leased_twice"] == 0
    assert report["drain"]["hub_leases_served"] > 0


def test_fleet_bench_refuses_a_negative_task_run_time() -> None:
    with pytest.raises(ValueError, match="task_s"):
        run_fleet_bench(FleetSize(agents=1, task_s=-1.0))


def test_fleet_bench_signs_a_big_drain_job_committed_and_its_agents_check_every_proof() -> None:
    """8,000 tasks (~72 KB of sweep, over the commit threshold): signed as ``panal submit`` signs it (a head and a
    Merkle root), no envelope fetched, every task proven and checked by the agent's own ManifestCache."""
    size = FleetSize(agents=4, idle_s=0.1, tasks=8_000, mixed_tasks=8, slots=4, procs=1)
    report = run_fleet_bench(size)
    assert report["agent_errors"] == [] and report["drain"]["state"] == "succeeded"
    assert report["tasks_leased"] == size.tasks + 2 * size.mixed_tasks and report["tasks_leased_twice"] == 0
    assert report["tasks_refused_by_agents"] == 0
    assert report["envelope_bytes_fetched"] == 0 and report["proof_bytes_per_assignment"] > 0
