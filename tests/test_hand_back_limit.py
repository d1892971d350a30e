"""Handing a lease back (a long pause, agent/daemon/pausing.py) costs no attempt, but only a few times: an
agent that leases a task and hands it back in a loop must not keep its job from ever ending."""

from __future__ import annotations

from pathlib import Path

from conftest import InProcessHub

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from hub.retries import FREE_HAND_BACKS
from jobs.manifest import Manifest
from security.identity import Identity


async def test_a_task_handed_back_in_a_loop_fails_when_its_attempts_run_out(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path)
    await hub.start()
    assert hub.address is not None and hub.server is not None
    liar_id, user = Identity.generate(), Identity.generate()
    liar, sub = BoardClient(hub.address, liar_id, retry_for_s=1), BoardClient(hub.address, user, retry_for_s=1)
    try:
        await liar.call("POST", "/v1/agents", {"public_key": liar_id.public.text(), "name": "liar",
                                               "capabilities": {"kinds": ["sleep"]}})
        await hub.server.add_submitter(user.public, "user")
        manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "held"},
                                       "spec": {"task": "sleep", "params": {"seconds": 0.0}, "policy": {"retries": 1}}})
        job = await submit(sub, make_envelope(user, manifest))
        for _ in range(FREE_HAND_BACKS + 10):
            reply = await liar.call("POST", "/v1/lease", {"slots": 1, "wait_s": 0})
            if not reply["tasks"]:
                break
            [task] = reply["tasks"]
            await liar.call("POST", f"/v1/tasks/{task['task_id']}/release", {"lease_id": task["lease_id"]})
        state = (await sub.call("GET", f"/v1/jobs/{job['id']}"))["job"]
        assert state["state"] == "failed", state
        assert "handed back" in state["error"]
    finally:
        for client in (liar, sub):
            await client.close()
        await hub.stop()
