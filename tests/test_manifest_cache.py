"""The agent's cache of verified manifests cannot be used by one board to swap in another job's manifest."""

from __future__ import annotations

import dataclasses
import tracemalloc

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


def sweep_envelope(user: Identity, n: int) -> SignedRecord:
    """Signed whole, however big (as a client before committed manifests signed it: agents still run those)."""
    return SignedRecord.from_wire(make_envelope(user, Manifest.from_dict(
        {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "big"},
         "spec": {"task": "sleep", "sweep": {"seconds": [i / 1e9 for i in range(n)]}}}, max_tasks=n),
        commit_bytes=1 << 40))


def sleep_task(envelope: SignedRecord, idx: int, seconds: float) -> Assignment:
    return Assignment(f"jbig.{idx}", "jbig", idx, "L", 1, "sleep", {"seconds": seconds}, 60.0, 30.0, envelope)


def test_a_sweep_over_the_default_job_limit_is_checked_unit_by_unit() -> None:
    """A board may allow 100,000 tasks a job (``max_tasks_per_job``): the agent runs them, checking each task
    against its own unit of the signed sweep, and still refuses one whose params or index were changed."""
    envelope = sweep_envelope(Identity.generate(), 100_000)
    cache = ManifestCache()
    submitter, manifest = cache.check(sleep_task(envelope, 99_999, 99_999 / 1e9))
    assert manifest.n_tasks == 100_000 and submitter == envelope.key.id
    assert cache.check(sleep_task(envelope, 12_345, 12_345 / 1e9))[0] == submitter
    for idx, seconds in ((12_345, 12_346 / 1e9), (100_000, 0.0), (-1, 0.0)):
        with pytest.raises(PanalError) as refused:
            cache.check(sleep_task(envelope, idx, seconds))
        assert refused.value.code == "tampered_task"


def test_the_cache_keeps_at_most_its_bytes_of_envelopes_and_always_the_newest() -> None:
    user = Identity.generate()
    envelopes = [sweep_envelope(user, 2_000 + i) for i in range(3)]   # ~18 KB of sweep each
    cache = ManifestCache(size=64, max_bytes=len(envelopes[0].payload) * 2 + 100)
    for e in envelopes:
        cache.check(sleep_task(e, 0, 0.0))
    assert len(cache._cache) == 2 and cache._bytes <= cache.max_bytes
    small = ManifestCache(size=64, max_bytes=10)   # smaller than any envelope: the newest stays
    small.check(sleep_task(envelopes[0], 1, 1 / 1e9))
    assert len(small._cache) == 1


def test_a_few_kb_manifest_sweeping_many_units_is_checked_without_expanding_them() -> None:
    """Found in review: the agent validated a whole-signed manifest with its 10^8-task bound, and validation
    expands every unit; a lying board (any key: trust is checked after) signing matmul over 100 sizes x 100
    iterations x 30 seeds (300k units, under 2 KB) made the agent hold 300k dicts; 1000 x 1000 x 100 would be 10^8."""
    source = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "wide"}, "spec": {
        "task": "matmul", "sweep": {"size": list(range(1, 101)), "iterations": list(range(1, 101)),
                                    "seed": list(range(30))}}}
    envelope = SignedRecord.sign(Identity.generate(), {"manifest": source, "created": 0.0, "nonce": "n"})
    assert len(envelope.payload) < 2048
    unit = 123_457   # the signed (sorted) keys iterations, seed, size, the last varying fastest: 42, 4, 58
    params = {"size": 58, "dtype": "float32", "iterations": 42, "seed": 4}
    task = Assignment(f"j.{unit}", "j", unit, "L", 1, "matmul", params, 60.0, 30.0, envelope)
    tracemalloc.start()
    try:
        ManifestCache().check(task)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB to check one task"
    with pytest.raises(PanalError) as caught:   # still held to the one unit it names
        ManifestCache().check(dataclasses.replace(task, params={**params, "seed": 8}))
    assert caught.value.code == "tampered_task"
