"""Committed manifests (jobs/committed.py, jobs/merkle.py): a big job signs a small head and the Merkle root of its
units; each assignment proves its one unit, and an agent checks it with the agent's own code
(agent/daemon/assignments.py) without ever holding the lists."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from test_shards import sharded_manifest

from agent.client.submitting import ResultCheck, job_id_of, make_envelope, prepare_inputs
from agent.client.sweep import check_params, sweep_of
from agent.daemon.assignments import ManifestCache
from hub.config import HubConfig
from jobs.committed import COMMIT_BYTES, UnitProof, open_lists, signed_manifest, unit_leaf
from jobs.inputs import input_blob
from jobs.manifest import Manifest
from jobs.merkle import MerkleTree, leaf_hash, proof_length, verify
from jobs.protocol import Assignment, LeaseReply
from jobs.wire import JSON, MSGPACK, decode_body, encode_body
from security.errors import BadRequest, PanalError
from security.identity import Identity
from security.records import SignedRecord, canonical, decode


def sweep(n: int, name: str = "big", base: float = 0.0) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": {"task": "sleep", "sweep": {"seconds": [base + i / 1e9 for i in range(n)]}}},
                              max_tasks=max(n, 1))


def committed(user: Identity, manifest: Manifest) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    """A committed envelope, its units' params and the board's proofs (as intake builds them)."""
    wire = make_envelope(user, manifest, commit_bytes=0)
    _, points, proofs = open_lists(SignedRecord.from_wire(wire).verify(), wire["units"], 10**6)
    return wire, points, proofs


def task(wire: dict[str, Any], idx: int, params: dict[str, Any], proof: UnitProof | None,
         kind: str = "sleep") -> Assignment:
    return Assignment(f"j.{idx}", "j", idx, "L", 1, kind, params, 60.0, 30.0, SignedRecord.from_wire(wire),
                      None, None, proof)


def refused(cache: ManifestCache, assignment: Assignment) -> str:
    with pytest.raises(PanalError) as caught:
        cache.check(assignment)
    return caught.value.code


def test_every_leaf_of_every_tree_shape_proves_only_at_its_own_index_and_count() -> None:
    for count in (1, 2, 3, 5, 8, 13, 33):
        leaves = [leaf_hash({"unit": i}) for i in range(count)]
        tree = MerkleTree(leaves)
        for i, leaf in enumerate(leaves):
            proof = tree.proof(i)
            assert len(proof) == proof_length(count, i) and verify(tree.root, count, i, leaf, proof)
            assert not verify(tree.root, count, count + i, leaf, proof)        # past the signed count
            assert not verify(tree.root, count, (i + 1) % count, leaf, proof) or count == 1
            assert not verify(tree.root, count, i, leaf, [*proof, leaf])       # no padding
            if proof:
                assert not verify(tree.root, count, i, leaf, proof[:-1])      # no cutting
                assert not verify(tree.root, count, i, leaf, [bytes(32), *proof[1:]])
    two = MerkleTree([leaf_hash({"unit": 0}), leaf_hash({"unit": 1})])
    # a node never passes as a leaf: the root of two leaves is no leaf of a one-leaf tree
    assert not verify(two.root, 1, 0, two.root[:0] + two.levels[0][:32], [])


def test_a_manifest_under_the_threshold_is_signed_exactly_as_before() -> None:
    small = sweep(100)
    wire = make_envelope(Identity.generate(), small)
    assert set(wire) == {"payload", "sig", "key"}
    payload = SignedRecord.from_wire(wire).verify()
    assert set(payload) == {"manifest", "created", "nonce"} and payload["manifest"] == decode(
        encode_body(small.source, MSGPACK))


def test_a_big_job_signs_a_small_head_and_its_lists_ride_beside_bound_by_the_root() -> None:
    big = sweep(100_000)
    wire = make_envelope(Identity.generate(), big)
    payload = SignedRecord.from_wire(wire).verify()
    assert len(wire["payload"]) < 1024 and "sweep" not in payload["manifest"]["spec"]
    assert payload["units"]["count"] == 100_000 and payload["units"]["sweep"] == ["seconds"]
    assert len(wire["units"]["sweep"]["seconds"]) == 100_000
    _, points, proofs = open_lists(payload, wire["units"], 100_000)
    assert points == big.points() and len(proofs.proof(0).path) == 17
    assert signed_manifest(wire)["spec"]["sweep"] == big.source["spec"]["sweep"]   # the submitter's own view


def test_lists_that_are_not_the_signed_ones_are_refused_with_their_own_code() -> None:
    wire = make_envelope(Identity.generate(), sweep(50), commit_bytes=0)
    payload = SignedRecord.from_wire(wire).verify()
    changed = {"sweep": {"seconds": [*wire["units"]["sweep"]["seconds"][:-1], 7.0]}, "shards": {}}
    shorter = {"sweep": {"seconds": wire["units"]["sweep"]["seconds"][:-1]}, "shards": {}}
    for lists in (changed, shorter):
        with pytest.raises(BadRequest) as caught:
            open_lists(payload, lists, 10_000)
        assert caught.value.code == "units_root_mismatch"
    for garbage, where in (("x", "envelope.units"), ({"sweep": {"seconds": 5}}, "envelope.units.sweep"),
                           ({"sweep": {}, "extra": []}, "envelope.units"), (None, "envelope.units")):
        with pytest.raises(BadRequest) as caught:
            open_lists(payload, garbage, 10_000)
        assert caught.value.code == "bad_field" and caught.value.details == {"field": where}
    inline = {**payload, "manifest": {**payload["manifest"], "spec": {
        **payload["manifest"]["spec"], "inputs": {"data": {"name": "d", "shards": []}}}}}
    with pytest.raises(BadRequest) as caught:   # a head's shard list would be what no proof is checked against
        open_lists(inline, wire["units"], 10_000)
    assert caught.value.details == {"field": "envelope.payload.manifest.spec.inputs.data.shards"}
    with pytest.raises(PanalError) as mismatch:   # the submitter's results view catches a board that swapped them
        signed_manifest({**wire, "units": changed})
    assert mismatch.value.code == "units_root_mismatch"


def test_the_agent_runs_a_proven_unit_and_refuses_any_other_the_board_makes_up() -> None:
    user = Identity.generate()
    wire, points, proofs = committed(user, sweep(1000))
    cache = ManifestCache()
    submitter, manifest = cache.check(task(wire, 731, points[731], proofs.proof(731)))
    assert submitter == user.public.id and manifest.kind == "sleep"
    other_wire, other_points, other_proofs = committed(user, sweep(1000, "other", base=1.0))
    lies = {
        "params swapped": task(wire, 731, points[730], proofs.proof(731)),
        "params and proof of another unit at this index": task(wire, 731, points[730], proofs.proof(730)),
        "index swapped": task(wire, 730, points[731], proofs.proof(731)),
        "index past the count": task(wire, 1000, points[731], proofs.proof(731)),
        "no proof": task(wire, 731, points[731], None),
        "a proof of another job": task(wire, 731, other_points[731], other_proofs.proof(731)),
        "a padded proof": task(wire, 731, points[731], UnitProof((*proofs.proof(731).path, bytes(32)))),
        "another kind": task(wire, 731, points[731], proofs.proof(731), kind="matmul"),
    }
    for why, lie in lies.items():
        assert refused(cache, lie) == "tampered_task", why
    # the other job's own units are fine under its own envelope (no cache mix-up)
    assert cache.check(task(other_wire, 5, other_points[5], other_proofs.proof(5)))[0] == user.public.id


def test_a_proven_unit_whose_head_its_kind_refuses_is_a_bad_manifest() -> None:
    """A submitter's client that signs what it should not (a board refuses it at intake; a lying one relays it):
    the unit proves, but the head made its manifest does not validate."""
    user = Identity.generate()
    head = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "bad"},
            "spec": {"task": "sleep", "params": {"nope": 1}}}
    tree = MerkleTree(unit_leaf(i, {"seconds": float(i)}, {}) for i in range(3))
    wire = SignedRecord.sign(user, {"manifest": head, "units": {"count": 3, "root": tree.root,
                                                                "sweep": ["seconds"]}}).to_wire()
    proof = UnitProof(tuple(tree.proof(1)))
    assert refused(ManifestCache(), task(wire, 1, {"seconds": 1.0}, proof)) == "bad_manifest"


def test_a_sharded_committed_job_runs_each_task_on_its_proven_shard_and_no_other(tmp_path: Path) -> None:
    prepared, _ = prepare_inputs(sharded_manifest(tmp_path, 10, 3))
    ref = prepared.inputs["data"]
    assert ref.shards is not None
    wire, points, proofs = committed(Identity.generate(), prepared)
    payload = SignedRecord.from_wire(wire).verify()
    assert "shards" not in payload["manifest"]["spec"]["inputs"]["data"] and len(wire["units"]["shards"]["data"]) == 3
    cache = ManifestCache()
    for idx, params in enumerate(points):
        _, manifest = cache.check(task(wire, idx, params, proofs.proof(idx), kind="inference"))
        assert input_blob(manifest.inputs["data"], params) == ref.shards[idx].blob
    # a board that hands unit 1 the shard of unit 2 (digest, or digest and rows) is caught by the root
    swapped = proofs.proof(1)
    for shard in ({**swapped.shards["data"], "blob": ref.shards[2].blob}, proofs.proof(2).shards["data"]):
        lie = dataclasses.replace(swapped, shards={"data": shard})
        assert refused(cache, task(wire, 1, points[1], lie, kind="inference")) == "tampered_task"


def test_garbage_proofs_on_the_wire_are_a_400_naming_the_field() -> None:
    user = Identity.generate()
    wire, points, proofs = committed(user, sweep(10))
    good = task(wire, 3, points[3], proofs.proof(3)).encode()
    for content_type in (MSGPACK, JSON):   # a JSON client's hashes are base64
        body = decode_body(encode_body({"tasks": [good]}, content_type), content_type)
        assert LeaseReply.decode(body).tasks[0].proof == proofs.proof(3)
    cases = {
        "tasks[0].proof": ["not a map", {"path": [], "extra": 1}],
        "tasks[0].proof.path": [{"path": [bytes(32)] * 49}, {"path": "x"}],
        "tasks[0].proof.path[0]": [{"path": [b"short"]}, {"path": [7]}],
        "tasks[0].proof.shards": [{"path": [], "shards": {"Bad Name": {}}}, {"path": [], "shards": []}],
        "tasks[0].proof.shards.data": [{"path": [], "shards": {"data": {"blob": "a" * 64}}}],
        "tasks[0].proof.shards.data.blob": [{"path": [], "shards": {"data": {"blob": "zz", "size": 1, "rows": 1,
                                                                             "start": 0}}}],
        "tasks[0].proof.shards.data.rows": [{"path": [], "shards": {"data": {"blob": "a" * 64, "size": 1, "rows": 0,
                                                                             "start": 0}}}],
    }
    for field, proofs_on_wire in cases.items():
        for proof in proofs_on_wire:
            with pytest.raises(BadRequest) as caught:
                LeaseReply.decode({"tasks": [{**good, "proof": proof}]})
            assert caught.value.details == {"field": field}, proof


def test_a_board_listing_far_more_units_than_signed_is_refused_before_they_are_expanded() -> None:
    """Found in review: the submitter's results view (``signed_manifest``, up to 10^8 tasks) expanded a lying
    board's lists before it compared them with the signed count; two swept keys of 700 values each made 490k
    dicts (and a tree) in the submitter's client, 10^4 x 10^4 would make 10^8."""
    head = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "two"}, "spec": {
        "task": "matmul", "sweep": {"size": [1, 2, 3], "iterations": [1, 2, 3]}}})
    wire = make_envelope(Identity.generate(), head, commit_bytes=0)
    many = {"sweep": {"size": list(range(1, 701)), "iterations": list(range(1, 701))}, "shards": {}}
    tracemalloc.start()
    try:
        with pytest.raises(PanalError) as caught:
            signed_manifest({**wire, "units": many})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "units_root_mismatch" and "490000 units" in caught.value.message
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB spent on lists the signed count rules out"
    assert signed_manifest(wire)["spec"]["sweep"] == head.source["spec"]["sweep"]   # the signed lists still open


def test_the_results_view_checks_the_params_of_a_job_of_more_than_ten_thousand_units() -> None:
    """Found in review: ``sweep_of`` validated the submitter's own manifest with the 10,000-task default, so the
    view of any bigger job (the jobs committed manifests are for) expanded nothing and showed whatever params an
    agent signed as verified."""
    wire = make_envelope(Identity.generate(), sweep(10_001))
    job_id = job_id_of(wire)
    reply = {"job": {"id": job_id}, "envelope": wire, "results": [{"task_id": f"{job_id}.5", "unit": 5}]}
    view = sweep_of(reply)
    assert view.points is not None and len(view.points) == 10_001 and view.params(5) == {"seconds": 5 / 1e9}
    lying = ResultCheck(f"{job_id}.5", "agent", True, "", {"unit": 5, "params": {"seconds": 99.0}})
    [checked] = check_params([lying], reply, view)
    assert not checked.ok and "the manifest gives" in checked.problem


def test_a_manifest_a_few_bytes_under_the_threshold_is_signed_so_that_a_default_board_inlines_it() -> None:
    """Found in review: the client compared the bare manifest's bytes with the threshold, a board the signed record's
    (with its time, nonce and signature): a manifest up to ~110 bytes under it was signed whole yet too big to
    inline (``inline_envelope_bytes``, the same 64 KiB), so every agent of the job fetched it."""
    n = next(n for n in range(7000, 7400) if COMMIT_BYTES - 60 < len(canonical({"manifest": sweep(n).source}))
             <= COMMIT_BYTES)
    wire = make_envelope(Identity.generate(), sweep(n))
    record = SignedRecord.from_wire(wire)
    inline = len(record.payload) + len(record.sig) <= HubConfig().inline_envelope_bytes
    assert inline or "units" in record.verify(), "signed whole, but a board would not inline it"
    assert "units" in record.verify() and signed_manifest(wire)["spec"]["sweep"] == sweep(n).source["spec"]["sweep"]
