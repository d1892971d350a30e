"""`panal bench integrity` at a small size: a smoke test of the benchmark's machinery and report (its
figures are measurements for notes, never asserted as goals here)."""

from __future__ import annotations

from agent.tools.bench_integrity import run_integrity_bench


def test_a_small_integrity_bench_reports_each_scenario_with_the_liars_it_caught() -> None:
    report = run_integrity_bench(300, 30, 1, scenarios=("mixed", "honest"), fixed=False)
    mixed, honest = report["mixed"], report["honest"]
    assert mixed["units_validated"] + mixed["units_no_consensus"] == mixed["units"] == 300
    assert mixed["false_rejections_of_honest_results"] == 0
    assert mixed["invalid_by_behaviour"]["always"] > 0 and mixed["quarantined"] > 0   # the always-liar is caught
    assert honest["units_validated"] == honest["units"] == 300
    assert 1.0 <= honest["overall_instances_per_unit"] <= 2.0 + 1e-9   # a new fleet replicates, then trusts
