"""Reading a sweep end to end, as a user does: `panal hub serve` and `panal agent run` as real processes over
TLS, a swept job with ``spec.report``, then `panal job` (best task) and `panal results --table/--csv/--json
--sort/--filter/--limit`, including failed tasks and bad expressions."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, panal, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for
from test_e2e import polling, start_agent

from agent.client.board import BoardClient
from security.identity import Identity
from security.records import SignedRecord
from security.tls import BoardAddress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(300))]

#: the test-only `chaos` kind (fails on purpose) on the hub, the agent and the CLI; no torch import in the worker
ENV = {"PANAL_TEST_KINDS": "1", "PANAL_WORKER_PRELOAD": "0"}

SLEEP_SWEEP = """apiVersion: panal/v1
kind: Job
metadata: {name: naps}
spec:
  task: sleep
  sweep: {seconds: [0.05, 0.3, 0.1]}
  report: {metric: slept, mode: max}
"""
CHAOS_SWEEP = """apiVersion: panal/v1
kind: Job
metadata: {name: flaky}
spec:
  task: chaos
  sweep: {mode: [ok, abort], seconds: [0, 0.01]}
  policy: {retries: 0}
"""


def signed_payloads(url: str, user_home: Path, job_id: str) -> list[dict[str, Any]]:
    """The agents' signed result payloads as the board stores them (signatures checked here)."""
    async def go() -> list[dict[str, Any]]:
        async with BoardClient(BoardAddress.parse(url), Identity.load(user_home / "user.key")) as client:
            reply = await client.call("GET", f"/v1/jobs/{job_id}/results")
            return [SignedRecord.from_wire(r["record"]).verify() for r in reply["results"]]
    return asyncio.run(go())


def data_lines(text: str) -> list[list[str]]:
    """The table's rows (header first), split into cells."""
    return [line.split() for line in text.strip().splitlines()]


def test_sweep_results_read_as_a_table_csv_and_json_with_the_best_task(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user, **ENV)
    start_agent(procs, tmp_path, url, "a1", "--slots", "2", **ENV)
    wait_for(lambda: polling(tmp_path / "a1"), "the agent to register and poll", timeout_s=AGENT_START_S,
             diagnose=procs.logs_text)
    (tmp_path / "naps.yaml").write_text(SLEEP_SWEEP)
    [job] = json.loads(panal("submit", str(tmp_path / "naps.yaml"), "--hub", url, "--wait", "--json", home=user,
                             timeout=200, **ENV).stdout)
    assert job["state"] == "succeeded"
    assert job["best"]["unit"] == 1 and job["best"]["value"] == 0.3 and job["best"]["params"] == {"seconds": 0.3}

    # the agent signed what it ran (unit and params) with what came of it
    signed = {p["unit"]: (p["params"], p["values"]) for p in signed_payloads(url, user, job["id"])}
    assert signed == {0: ({"seconds": 0.05}, {"slept": 0.05}), 1: ({"seconds": 0.3}, {"slept": 0.3}),
                      2: ({"seconds": 0.1}, {"slept": 0.1})}

    shown = panal("job", job["id"], "--hub", url, home=user, **ENV).stdout
    assert "best: task 1 (slept=0.3, max of the accepted results)  seconds=0.3" in shown

    def results(*args: str) -> str:
        return panal("results", job["id"], "--hub", url, *args, home=user, **ENV).stdout

    table = data_lines(results("--table"))   # spec.report: best first without --sort
    assert table[0] == ["TASK", "STATE", "seconds", "slept"]
    assert [row[0] for row in table[1:]] == ["1", "2", "0"]
    assert table[1] == ["1", "done", "0.3", "0.3"]
    assert [row[0] for row in data_lines(results("--sort", "slept", "--limit", "2"))[1:]] == ["0", "2"]
    assert [row[0] for row in data_lines(results("--filter", "seconds >= 0.1 and slept < 0.2"))[1:]] == ["2"]

    rows = list(csv.DictReader(io.StringIO(results("--csv", "--sort", "-wall_s"))))
    assert len(rows) == 3 and {r["state"] for r in rows} == {"done"}
    assert {r["seconds"] for r in rows} == {"0.05", "0.3", "0.1"} and all(float(r["wall_s"]) > 0 for r in rows)
    assert [float(r["wall_s"]) for r in rows] == sorted((float(r["wall_s"]) for r in rows), reverse=True)
    assert all(r["verified"] == "True" and r["task_id"].startswith(job["id"]) for r in rows)

    index = json.loads(results("--json", "--verify"))
    assert {r["unit"]: r["params"] for r in index["results"]} == {0: {"seconds": 0.05}, 1: {"seconds": 0.3},
                                                                 2: {"seconds": 0.1}}
    assert [r["unit"] for r in index["rows"]] == [1, 2, 0]
    assert index["rows"][0]["values"] == {"slept": 0.3} and index["rows"][0]["verified"]

    bad = panal("results", job["id"], "--hub", url, "--filter", "slept >", home=user, check=False, **ENV)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "error: filter: expected a value" in bad.stderr and "at column 8" in bad.stderr
    typo = panal("results", job["id"], "--hub", url, "--sort", "-slep", home=user, check=False, **ENV)
    assert typo.returncode == 1 and "--sort: no task has 'slep'; names here:" in typo.stderr
    assert "slept" in typo.stderr and "Traceback" not in typo.stderr

    (tmp_path / "flaky.yaml").write_text(CHAOS_SWEEP)
    sub = panal("submit", str(tmp_path / "flaky.yaml"), "--hub", url, "--wait", "--json", home=user, timeout=200,
                check=False, **ENV)
    [flaky] = json.loads(sub.stdout)
    assert sub.returncode == 2 and flaky["state"] == "failed" and flaky["best"] is None
    out = panal("results", flaky["id"], "--hub", url, "--table", "--sort", "mode", home=user, **ENV).stdout
    table = data_lines(out)
    # the kind returns a value named like a param: both shown, each with its section
    # (chaos also returns the threads it ran with: columns after the ones read here, before ERROR)
    assert table[0][:5] == ["TASK", "STATE", "params.mode", "seconds", "values.mode"] and table[0][-1] == "ERROR"
    assert sorted(tuple(r[1:5]) for r in table[1:]) == [("done", "ok", "0", "ok"), ("done", "ok", "0.01", "ok"),
                                                         ("failed", "abort", "0", "crashed"),
                                                         ("failed", "abort", "0.01", "crashed")]
    assert all(r[-1] == "crashed" for r in table[1:] if r[1] == "failed")
    failed = json.loads(panal("results", flaky["id"], "--hub", url, "--json", "--filter", "state == \"failed\"",
                              home=user, **ENV).stdout)["rows"]
    assert [r["params"]["mode"] for r in failed] == ["abort", "abort"]
    assert all(r["error_class"] == "crashed" and r["values"] == {} for r in failed)
