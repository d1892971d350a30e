"""``panal bench chaos --store postgresql://...``: the soak's hub on PostgreSQL, audited from PostgreSQL."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from agent.cli.tools import bench
from agent.tools.bench_chaos import run_chaos_bench

FIGURES = {"tasks", "done", "results", "duplicates", "lost", "requeues", "unverified", "hub_recovery_s",
           "hub_recovery_s_max", "agent_kills", "agent_freezes", "hub_kills", "leases_expired",
           "duplicate_deliveries", "late_results_rejected", "throughput_tasks_per_s"}


@pytest.mark.slow
def test_a_chaos_soak_on_postgresql_loses_and_duplicates_nothing_by_the_databases_own_count(pg: str) -> None:
    report = run_chaos_bench(minutes=0.3, agents=2, seed=7, store=pg)
    missing = {name for name in FIGURES if name not in report}
    assert not missing
    assert all(report[name] is not None for name in FIGURES - {"hub_recovery_s_max"})  # None: no hub kill yet
    assert report["store"] == "postgresql"
    assert report["jobs"] >= 1 and report["tasks"] == 10 * report["jobs"]   # the jobs were found in PostgreSQL
    assert report["done"] == report["results"] == report["tasks"]
    assert (report["lost"], report["duplicates"], report["unverified"]) == (0, 0, 0)
    assert report["ok"] is True


def test_bench_chaos_refuses_a_store_that_is_neither_sqlite_nor_postgresql() -> None:
    out = CliRunner().invoke(bench, ["chaos", "--minutes", "0.1", "--store", "mysql://db/x"])
    assert out.exit_code == 2
    assert "expected 'sqlite' or a postgresql:// URL" in out.output
