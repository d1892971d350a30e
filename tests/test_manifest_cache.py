"""The agent's cache of verified manifests cannot be used by one board to swap in another job's manifest."""

from __future__ import annotations

import pytest

from agent.client.submitting import make_envelope
from agent.daemon.assignments import ManifestCache
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from security.errors import PanalError
from security.identity import Identity
from security.records import SignedRecord


@pytest.fixture(autouse=True)
def _test_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")


def job(source: str) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "c"},
                               "spec": {"task": "untrusted", "params": {"source": source}}})


def assignment(job_id: str, envelope: SignedRecord, source: str) -> Assignment:
    params = job(source).points()[0]
    return Assignment(f"{job_id}.0", job_id, 0, "L", 1, "untrusted", params, 60.0, 30.0, envelope)


def test_an_envelope_under_another_boards_job_id_is_checked_as_itself() -> None:
    cache = ManifestCache()
    honest, hostile = Identity.generate(), Identity.generate()
    theirs = SignedRecord.from_wire(make_envelope(honest, job("result['x'] = 1")))
    mine = SignedRecord.from_wire(make_envelope(hostile, job("result['x'] = 2")))
    # the hostile board leases first under the honest board's job id, with its own envelope
    submitter, manifest = cache.check(assignment("jshared", mine, "result['x'] = 2"))
    assert submitter == hostile.public.id
    # the honest board's task of that id is checked against its own envelope, not the cached one
    submitter, manifest = cache.check(assignment("jshared", theirs, "result['x'] = 1"))
    assert submitter == honest.public.id and manifest.params["source"] == "result['x'] = 1"
    # and an envelope named under a job id it was cached with cannot stand for a different one
    with pytest.raises(PanalError):
        cache.check(assignment("jshared", theirs, "result['x'] = 2"))
