"""Fleet files for the dispatch simulator (configs/sim/, ``panal hub sim --fleet``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main as cli
from agent.tools.sim_fleets import FleetFileError, load_scenario
from agent.tools.simulate import run_simulation

SIM = Path(__file__).resolve().parent.parent / "configs" / "sim"


@pytest.mark.parametrize("name", ["university-lab", "gaming-community", "flaky-overnight"])
def test_each_fleet_file_loads_with_hosts_submitters_and_work(name: str) -> None:
    scenario = load_scenario(SIM / f"{name}.yaml", scale=0.01 if name == "gaming-community" else 1.0)
    assert sum(h.count for h in scenario.hosts) > 0 and len(scenario.weights) >= 3
    work = scenario.workload(__import__("random").Random(1))
    assert work and {who for _, who, _ in work} == set(scenario.weights)
    assert any("deadline" in m["spec"].get("policy", {}) for _, _, m in work)
    assert any(m["spec"].get("requires") for _, _, m in work)


def test_the_full_gaming_community_has_ten_thousand_gpus() -> None:
    scenario = load_scenario(SIM / "gaming-community.yaml")
    assert sum(h.count for h in scenario.hosts) == 10_000


def test_a_fleet_file_is_simulated_and_reports_fairness_deadlines_and_pick_times() -> None:
    scenario = load_scenario(SIM / "flaky-overnight.yaml", scale=0.1)
    [row] = run_simulation(["fair-share"], seed=1, scenario=scenario)
    assert row["agents"] == sum(h.count for h in scenario.hosts) and row["tasks"] > 0
    assert row["done"] + row["failed"] + row["unfinished"] == row["tasks"]
    assert 0 < row["jain"] <= 1 and row["deadline_tasks"] > 0 and row["picks"] > 0
    assert row["pick_p99_ms"] >= row["pick_p50_ms"] > 0


def test_a_broken_fleet_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  - {kind: x, count: 2, gpu: nope}\nworkload: []\n")
    with pytest.raises(FleetFileError, match=r"hosts\[0\]\.gpu: no GPU named 'nope'"):
        load_scenario(bad)
    result = CliRunner().invoke(cli, ["hub", "sim", "--fleet", str(bad)])
    assert result.exit_code != 0 and "hosts[0].gpu: no GPU named 'nope'" in result.output
    assert "Traceback" not in result.output
