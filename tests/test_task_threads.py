"""Threads: a manifest asks for CPU threads (``spec.resources.threads``) and gets them within what the
volunteer lends; workers wait passively (OpenMP), so threads that wait do not spin on busy cores.
The real daemon runs real tasks leased from a real board."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from helpers import wait_for_async

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit, verify_results
from agent.daemon import Daemon, DaemonSettings
from agent.daemon.threads import lent_threads, task_threads
from agent.host.home import AgentHome
from jobs.manifest import Manifest, ManifestError
from security.identity import Identity


def chaos_job(name: str, threads: int | None) -> Manifest:
    resources: dict[str, Any] = {} if threads is None else {"threads": threads}
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "chaos", "params": {"mode": "ok"}, "resources": resources}})


def test_a_manifest_asks_for_threads_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")
    assert chaos_job("a", 3).threads == 3 and chaos_job("b", None).threads is None
    with pytest.raises(ManifestError, match="threads"):
        chaos_job("c", 0)


def test_lent_threads_follow_the_volunteer() -> None:
    assert lent_threads(0, None, cores=8, slots=2) == 4
    assert lent_threads(0, 3, cores=8, slots=2) == 3      # the cpu_threads preference
    assert lent_threads(6, 3, cores=8, slots=2) == 6      # --threads wins
    assert lent_threads(0, None, cores=2, slots=4) == 1
    assert [task_threads(asked, 4) for asked in (None, 1, 4, 64)] == [4, 1, 4, 4]


async def test_tasks_get_the_threads_they_ask_for_within_what_is_lent(
        tmp_path: Path, hub: InProcessHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")
    monkeypatch.setenv("PANAL_WORKER_PRELOAD", "0")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert hub.server is not None and hub.address is not None
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "user")
    jobs = {}
    async with BoardClient(hub.address, user) as client:
        for name, asked in (("one", 1), ("many", 64), ("silent", None)):
            jobs[name] = (await submit(client, make_envelope(user, chaos_job(name, asked))))["id"]
    home = AgentHome(tmp_path / "home")
    home.ensure()
    (home.root / "prefs.yaml").write_text("pause_on_battery: false\n")
    daemon = Daemon(home, [], DaemonSettings(drain_s=0, threads=2, poll_wait_s=0.5), allow_no_board=True)
    daemon.add_board(hub.address)
    try:
        await wait_for_async(lambda: daemon.status()["done"] == 3, "the three tasks to run")
    finally:
        await daemon.shutdown()
    values = {}
    async with BoardClient(hub.address, user) as client:
        for name, job_id in jobs.items():
            [check] = verify_results(dict(await client.call("GET", f"/v1/jobs/{job_id}/results")))
            assert check.ok, check.problem
            values[name] = check.payload["values"]
    assert {name: v["threads"] for name, v in values.items()} == {"one": 1, "many": 2, "silent": 2}
    assert {v["omp_wait_policy"] for v in values.values()} == {"PASSIVE"}
