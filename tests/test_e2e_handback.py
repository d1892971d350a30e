"""A long pause hands work back, as real processes: a hub and two agents (`panal hub serve`,
`panal agent run`). The first agent's allowed hours close while it trains; it gives the task back
with its latest checkpoint instead of holding it for the night, the second agent finishes it from
that checkpoint, and the paused agent counts no compute meanwhile."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for
from test_e2e import agent_id, agent_status, job_view, start_agent

from agent.volunteer.preferences import set_preference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(420))]


def _closed_window() -> str:
    """Allowed hours that are closed now and open in more than a day: a pause far longer than the
    hand-back threshold, as a weeknight window is at 19:00."""
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now().weekday() + 3) % 7]
    return f"{day} 00:00-01:00"


def test_an_agent_paused_by_its_time_window_hands_the_task_to_another_that_resumes_it(tmp_path: Path,
                                                                                     procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user, PANAL_HUB_LEASE_TTL_S="10")   # checkpoints reach it sooner
    # A short home: the control socket lives there and unix socket paths are limited to ~104 bytes.
    first = Path(tempfile.mkdtemp(prefix="pnl-"))
    start_agent(procs, tmp_path, url, "first", home=first)
    manifest = tmp_path / "train.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: resumable}\n"
                        "spec:\n  task: mlp_train\n  params: {samples: 4096, epochs: 300, hidden_size: 256,"
                        " checkpoint_every_s: 0.5}\n")
    [job] = json.loads(panal("submit", str(manifest), "--hub", url, "--json", home=user).stdout)
    wait_for(lambda: job_view(url, user, job["id"])["task_list"][0]["checkpoint"], "a checkpoint to reach the board",
             timeout_s=AGENT_START_S, diagnose=procs.logs_text)

    # The evening starts (as `panal agent set time_windows ...` writes it; the running agent reloads it).
    set_preference(first / "prefs.yaml", "time_windows", _closed_window())

    def handed_back() -> bool:
        [task] = job_view(url, user, job["id"])["task_list"]
        return task["state"] == "queued" and not agent_status(first)["tasks"]
    wait_for(handed_back, "the paused agent to hand the task back", diagnose=procs.logs_text)
    paused = agent_status(first)
    assert paused["paused"] and paused["reason"].startswith("outside the allowed hours")
    [queued] = job_view(url, user, job["id"])["task_list"]
    assert queued["checkpoint"] and queued["attempt"] == 1     # given back: the checkpoint kept, no attempt used

    second = tmp_path / "second"
    start_agent(procs, tmp_path, url, "second", home=second)
    wait_for(lambda: job_view(url, user, job["id"])["state"] == "succeeded", "the second agent to finish it",
             timeout_s=scaled(240), diagnose=procs.logs_text)
    res = json.loads(panal("results", job["id"], "--hub", url, "--verify", "--json", home=user).stdout)
    [row] = res["results"]
    resumed = row["values"]["resumed_from"]             # where the first agent's last checkpoint was
    assert row["verified"] and (resumed["epoch"], resumed["batch"]) > (0, 0)
    assert row["agent"] == agent_id(second) and row["resumed_from"] == agent_id(first)

    later = agent_status(first)                         # still paused, and nothing was counted meanwhile
    assert later["paused"] and later["tasks"] == []
    assert later["compute_today_h"] == paused["compute_today_h"]
