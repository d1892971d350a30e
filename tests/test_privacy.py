"""Privacy between submitters over real TLS: a submitter lists and reads only its own jobs and results;
another's job is the same 404 as no job at all; an admin key (hub.yaml ``admins``) sees every job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessHub
from test_api import sleep_manifest

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from security.errors import Forbidden, NotFound
from security.identity import Identity


async def as_submitter(hub: InProcessHub, identity: Identity) -> BoardClient:
    assert hub.address is not None and hub.server is not None
    await hub.server.add_submitter(identity.public, "user")
    return BoardClient(hub.address, identity, retry_for_s=1)


async def not_found(client: BoardClient, method: str, path: str) -> Any:
    with pytest.raises(NotFound) as exc:
        await client.call(method, path)
    return exc.value


async def test_a_submitter_lists_and_reads_only_its_own_jobs(tmp_path: Path) -> None:
    admin_key = Identity.generate()
    hub = InProcessHub(tmp_path, admins=(admin_key.id,))
    await hub.start()
    alice = await as_submitter(hub, Identity.generate())
    bob = await as_submitter(hub, Identity.generate())
    admin = await as_submitter(hub, admin_key)
    try:
        mine = await submit(alice, make_envelope(alice.identity, sleep_manifest(2)))
        theirs = await submit(bob, make_envelope(bob.identity, sleep_manifest(1)))
        listed = {j["id"] for j in (await alice.call("GET", "/v1/jobs"))["jobs"]}
        assert listed == {mine["id"]}
        assert {j["id"] for j in (await bob.call("GET", "/v1/jobs", query="state=queued"))["jobs"]} == {theirs["id"]}
        # Bob reading Alice's job gets exactly what a job that does not exist gets: no leak of existence.
        absent = await not_found(bob, "GET", "/v1/jobs/job-that-does-not-exist")
        for suffix in ("", "/tasks", "/results"):
            refused = await not_found(bob, "GET", f"/v1/jobs/{mine['id']}{suffix}")
            assert (refused.code, str(refused).replace(mine["id"], "X")) == \
                (absent.code, str(absent).replace("job-that-does-not-exist", "X"))
        await not_found(bob, "DELETE", f"/v1/jobs/{mine['id']}")
        # The owner still reads everything, manifest included.
        assert (await alice.call("GET", f"/v1/jobs/{mine['id']}"))["job"]["id"] == mine["id"]
        assert (await alice.call("GET", f"/v1/jobs/{mine['id']}/results"))["envelope"]
        # The admin sees every submitter's jobs and results, but cancels only its own.
        assert {j["id"] for j in (await admin.call("GET", "/v1/jobs"))["jobs"]} == {mine["id"], theirs["id"]}
        assert (await admin.call("GET", f"/v1/jobs/{theirs['id']}/results"))["job"]["id"] == theirs["id"]
        with pytest.raises(Forbidden):
            await admin.call("DELETE", f"/v1/jobs/{theirs['id']}")
        # Public views stay public: the status page's job view needs no key.
        public = await bob.call("GET", f"/v1/jobs/{mine['id']}/public")
        assert "labels" not in public["job"] and "envelope" not in public
    finally:
        for client in (alice, bob, admin):
            await client.close()
        await hub.stop()
