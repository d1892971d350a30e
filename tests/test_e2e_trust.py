"""A volunteer that lies, as real processes: `panal hub serve`, one lying and two honest `panal agent run`.

The liar is made to lie by the test-only hook PANAL_TEST_ALTER_RESULTS (agent/daemon/execution.py):
it signs altered values for every task. The quorum answer must be the honest one, the liar's instances
`invalid` with no credit, and `panal results --verify` must check out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for
from test_e2e import SLEEP_ONLY, agent_id, agent_status, job_view, polling, start_agent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]

SECONDS = [0.2, 0.3, 0.4]


def standing(home: Path) -> dict[str, Any]:
    """What the board last told this running agent of its standing (credit, invalid results)."""
    boards = agent_status(home)["boards"]
    return dict(boards[0].get("standing") or {}) if boards else {}


def test_a_lying_agent_is_outvoted_by_two_honest_ones_and_earns_nothing(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="10")
    # The liar alone polls when the job arrives: it takes work first, and every unit it touches needs a tiebreak.
    start_agent(procs, tmp_path, url, "liar", "--slots", "1", PANAL_TEST_ALTER_RESULTS="1", **SLEEP_ONLY)
    wait_for(lambda: polling(tmp_path / "liar"), "the liar to register and poll", timeout_s=AGENT_START_S,
             diagnose=procs.logs_text)
    manifest = tmp_path / "sleep.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: vote}\n"
                        f"spec: {{task: sleep, sweep: {{seconds: {SECONDS}}},\n"
                        "       policy: {validation: {quorum: 2, adaptive: false}}}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    liar = agent_id(tmp_path / "liar")
    wait_for(lambda: any(t["agent"] == liar for t in job_view(url, user, job["id"])["task_list"]),
             "the liar to lease an instance", timeout_s=AGENT_START_S, diagnose=procs.logs_text)
    for name in ("h1", "h2"):
        start_agent(procs, tmp_path, url, name, "--slots", "1", **SLEEP_ONLY)
    wait_for(lambda: job_view(url, user, job["id"])["state"] == "succeeded", "the honest agents to settle every task",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text)

    res = panal("results", job["id"], "--hub", url, "--verify", "--json", home=user)   # exits 2 on a bad record
    index = json.loads(res.stdout)
    honest = {agent_id(tmp_path / "h1"), agent_id(tmp_path / "h2")}
    assert [t["task_id"] for t in index["tasks"]] == [f"{job['id']}.{i}" for i in range(len(SECONDS))]
    for task, seconds in zip(index["tasks"], SECONDS, strict=True):
        assert task["state"] == "validated" and task["quorum"] == 2
        assert set(task["agents"]) == honest and task["canonical"]["agent_id"] in honest
        assert task["canonical"]["values"] == {"slept": seconds}
    text = panal("results", job["id"], "--hub", url, home=user).stdout
    assert text.count("validated by 2 agent(s) (quorum 2)") == len(SECONDS) and "invalid:" in text
    lies = [r for r in index["results"] if r["agent"] == liar]
    assert lies and all(r["state"] == "invalid" and r["verified"] for r in lies)
    assert all(r["state"] == "done" for r in index["results"] if r["agent"] != liar)
    assert sum(len(t["invalid"]) for t in index["tasks"]) == len(lies)
    # Credit: the liar none, each honest agent the same for each task (the sleep kind's cost: its seconds).
    wait_for(lambda: standing(tmp_path / "liar").get("invalid_results") == len(lies),
             "the board to tell the liar of its invalid results", timeout_s=scaled(60), diagnose=procs.logs_text)
    assert standing(tmp_path / "liar")["credit"] == 0.0
    for name in ("h1", "h2"):
        wait_for(lambda name=name: standing(tmp_path / name).get("credit") == pytest.approx(sum(SECONDS)),
                 f"{name}'s credit to be the work of every task", timeout_s=scaled(60), diagnose=procs.logs_text)
