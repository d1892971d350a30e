"""Resource bounds (issue #16 part 8): absolute bounds in the manifest schema, hub limits enforced at
submit (over real TLS) and reported by `panal validate --hub` (the real CLI against a real hub
process), a default memory cap, and the volunteer's ``max_memory_gb``: enforced on its tasks and
advertised, so the board does not send it larger work."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import InProcessHub, Procs, panal, start_hub_proc
from helpers import FakeClock

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.daemon import Daemon, DaemonSettings
from agent.host.home import AgentHome
from agent.volunteer.preferences import PreferenceError, load_preferences, set_preference
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.manifest import DEFAULT_MEMORY_GB, Manifest, ManifestError
from jobs.requirements import Capabilities, Requirements, explain, unmet
from security.errors import BadRequest
from security.identity import Identity

HEAD = "apiVersion: panal/v1\nkind: Job\nmetadata: {name: r}\n"


def manifest(**resources: object) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "r"},
                               "spec": {"task": "sleep", "resources": resources}})


@pytest.mark.parametrize(("resources", "field"), [({"max_memory_gb": 100000}, "max_memory_gb"),
                                                  ({"timeout": "3650d"}, "timeout"),
                                                  ({"timeout": 10**9}, "timeout")])
def test_absurd_resources_do_not_validate(resources: dict[str, object], field: str) -> None:
    with pytest.raises(ManifestError, match=f"spec.resources.{field}"):
        manifest(**resources)


def test_a_manifest_without_a_memory_cap_gets_the_default() -> None:
    assert manifest().memory_cap_gb == DEFAULT_MEMORY_GB
    assert manifest(max_memory_gb=12).memory_cap_gb == 12


async def test_the_hub_refuses_a_job_over_its_limits_with_a_clear_400(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path, max_task_timeout_s=3600, max_task_memory_gb=8)
    server = await hub.start()
    assert hub.address is not None
    user = Identity.generate()
    await server.add_submitter(user.public, "user")
    try:
        async with BoardClient(hub.address, user, retry_for_s=1) as client:
            for resources, words in (({"timeout": "2h"}, "max_task_timeout_s"),
                                     ({"max_memory_gb": 16}, "max_task_memory_gb")):
                with pytest.raises(BadRequest, match=words) as exc:
                    await submit(client, make_envelope(user, manifest(**resources)))
                assert exc.value.code == "over_hub_limit"
            job = await submit(client, make_envelope(user, manifest(timeout="1h")))   # default cap 4 <= 8
            assert job["state"] == "queued"
            limits = await client.call("GET", "/v1/limits")
            assert (limits["max_task_timeout_s"], limits["max_task_memory_gb"]) == (3600, 8)
    finally:
        await hub.stop()


def test_validate_reports_a_hubs_limits(tmp_path: Path, procs: Procs) -> None:
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user, PANAL_HUB_MAX_TASK_MEMORY_GB="2")
    big, small = tmp_path / "big.yaml", tmp_path / "small.yaml"
    big.write_text(HEAD + "spec: {task: sleep}\n")                                    # the default cap: 4 GB
    small.write_text(HEAD + "spec: {task: sleep, resources: {max_memory_gb: 1}}\n")
    assert "ok (sleep" in panal("validate", str(big), home=user).stdout              # no hub: the schema only
    out = panal("validate", str(big), "--hub", url, home=user, check=False)
    assert out.returncode == 1 and "max_task_memory_gb" in out.stderr and "Traceback" not in out.stderr
    ok = panal("validate", str(small), "--hub", url, home=user)
    assert "memory cap 1 GB" in ok.stdout


def test_an_agent_whose_volunteer_allows_less_memory_is_not_matched() -> None:
    req = Requirements.from_dict({"task_memory_gb": 4.0})
    small = Capabilities.from_dict({"kinds": ["sleep"], "max_memory_gb": 2})
    roomy = Capabilities.from_dict({"kinds": ["sleep"], "max_memory_gb": 8})
    silent = Capabilities.from_dict({"kinds": ["sleep"]})
    assert unmet(req, "sleep", small) == ["max_memory_gb"]
    assert unmet(req, "sleep", roomy) == [] and unmet(req, "sleep", silent) == []
    assert "allowing 4 GB per task" in explain(req, "sleep", [small])[0]


def test_the_volunteers_max_memory_gb_is_advertised_and_caps_its_tasks(tmp_path: Path) -> None:
    with pytest.raises(PreferenceError, match="max_memory_gb"):
        set_preference(tmp_path / "p.yaml", "max_memory_gb", "lots")
    home = AgentHome(tmp_path / "home")
    home.ensure()
    set_preference(home.root / "prefs.yaml", "pause_on_battery", "false")
    set_preference(home.root / "prefs.yaml", "max_memory_gb", "2")
    assert load_preferences(home.root / "prefs.yaml").max_memory_gb == 2.0
    daemon = Daemon(home, [], DaemonSettings(drain_s=0), allow_no_board=True)
    assert daemon.registration().capabilities.raw["max_memory_gb"] == 2.0
    assert daemon.executor.memory_cap_gb(manifest()) == 2.0                 # the default 4, within 2
    assert daemon.executor.memory_cap_gb(manifest(max_memory_gb=1)) == 1.0


async def test_the_board_sends_no_task_over_a_volunteers_memory_ceiling(tmp_path: Path) -> None:
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(expiry_interval_s=3600), FakeClock(1_000_000.0))
    await board.start()
    try:
        user, small, roomy = Identity.generate(), Identity.generate(), Identity.generate()
        await board.register_agent(small.public, "s", Capabilities.from_dict({"kinds": ["sleep"], "max_memory_gb": 2}))
        await board.register_agent(roomy.public, "r", Capabilities.from_dict({"kinds": ["sleep"], "max_memory_gb": 8}))
        job, _ = await board.submit(make_envelope(user, manifest()), user.id)   # the default cap, 4 GB
        assert await board.lease(small.id, 1, 0) == []
        assert any("allowing 4 GB per task" in r for r in (await board.job_view(job.id))["waiting_because"])
        [task] = await board.lease(roomy.id, 1, 0)
        assert task.job_id == job.id
    finally:
        await board.stop()
