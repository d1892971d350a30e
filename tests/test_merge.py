"""Merging a row-sharded job's outputs (agent/client/merge.py) from real signed results and real shard files:
rows in input order, byte for byte; a missing, unvalidated or mislabelled shard is refused by name."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.client.merge import MergeError, merge_outputs
from agent.client.submitting import job_id_of, make_envelope, output_file_name, task_dir_name, verify_results
from agent.client.validation import unit_rows
from jobs.manifest import Manifest
from security.identity import Identity
from security.records import SignedRecord

ROWS, COUNT = 10, 3
SHARDS = [(0, 4), (4, 7), (7, 10)]   # jobs.kinds.inference.shard_rows(10, 3, i)


def sharded_manifest(sweep: dict[str, Any] | None = None) -> Manifest:
    spec: dict[str, Any] = {"task": "inference", "inputs": {
        "model": {"blob": "a" * 64, "size": 1, "name": "model.pt2"},
        "data": {"blob": "b" * 64, "size": 1, "name": "x.safetensors", "rows": ROWS,
                 "shard": {"by": "rows", "count": COUNT}}}}
    if sweep:
        spec["sweep"] = sweep
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "m"}, "spec": spec})


def whole() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {"y0": torch.randn(ROWS, 3, generator=gen),
            "y1": torch.randint(0, 1000, (ROWS, 2, 2), generator=gen, dtype=torch.int64)}


def signed_job(tmp_path: Path, *, skip: tuple[int, ...] = (), rows: dict[int, tuple[int, int]] | None = None,
               manifest: Manifest | None = None) -> tuple[dict[str, Any], Path]:
    """A job's results reply as a board gives it: the submitter's envelope, each shard's result signed by
    its agent, with the shard's file downloaded where `panal results -o` puts it."""
    submitter, agent = Identity.generate(), Identity.generate()
    envelope = make_envelope(submitter, manifest or sharded_manifest())
    job_id = job_id_of(envelope)
    out = tmp_path / "out"
    results = []
    for unit, (start, end) in enumerate(SHARDS):
        if unit in skip:
            continue
        task_id = f"{job_id}.{unit}"
        claimed = (rows or {}).get(unit, (start, end))
        path = out / task_id / "outputs.safetensors"
        path.parent.mkdir(parents=True)
        save_file({k: v[claimed[0]:claimed[1]].contiguous() for k, v in whole().items()}, str(path),
                  {"row_start": str(claimed[0]), "row_end": str(claimed[1]), "input_key": "x"})
        payload = {"task_id": task_id, "job_id": job_id, "agent_id": agent.id, "status": "ok",
                   "values": {"row_start": claimed[0], "row_end": claimed[1]},
                   "outputs": {"outputs": {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                           "size": path.stat().st_size, "name": "outputs.safetensors"}}}
        record = SignedRecord.sign(agent, payload)
        results.append({"task_id": task_id, "agent": agent.id, "digest": hashlib.sha256(record.payload).hexdigest(),
                        "record": record.to_wire(), "unit": unit, "state": "done"})
    reply = {"job": {"id": job_id, "state": "succeeded"}, "envelope": envelope, "results": results,
             "validation": {"policy": {}, "units": []}}
    return reply, out


def merge(reply: dict[str, Any], out: Path) -> dict[str, Path]:
    checks = verify_results(reply)
    return merge_outputs(reply, checks, unit_rows(reply, checks), out)


def test_merge_concatenates_every_tensor_in_input_order_byte_for_byte(tmp_path: Path) -> None:
    reply, out = signed_job(tmp_path)
    merged = merge(reply, out)
    assert merged == {"outputs": out / "outputs.safetensors"}
    got = load_file(str(merged["outputs"]))
    assert got.keys() == {"y0", "y1"}
    assert all(torch.equal(got[k], v) for k, v in whole().items())
    assert not list(out.glob("*.partial"))


def test_a_missing_shard_is_refused_naming_it_and_its_rows(tmp_path: Path) -> None:
    reply, out = signed_job(tmp_path, skip=(1,))
    with pytest.raises(MergeError, match=r"1 of 3 shard\(s\).*\n  shard 1 \(rows 4\.\.7, task j\w+\.1\): no result"):
        merge(reply, out)
    assert not (out / "outputs.safetensors").exists()


def test_an_unvalidated_or_forged_shard_is_refused(tmp_path: Path) -> None:
    reply, out = signed_job(tmp_path)
    reply["results"][2]["state"] = "pending"        # quorum 1: a result the board has not accepted
    with pytest.raises(MergeError, match=r"shard 2 \(rows 7\.\.10.*not validated yet"):
        merge(reply, out)
    reply, out = signed_job(tmp_path / "forged")
    reply["results"][0]["digest"] = "0" * 64          # the board's digest no longer matches the signed record
    with pytest.raises(MergeError, match=r"shard 0 \(rows 0\.\.4.*no verified result \(digest differs"):
        merge(reply, out)


def test_a_shard_holding_other_rows_than_the_manifest_gives_it_is_refused(tmp_path: Path) -> None:
    reply, out = signed_job(tmp_path, rows={1: (4, 8)})   # the agent signed and wrote rows 4..8
    with pytest.raises(MergeError, match=r"shard 1 \(rows 4\.\.7.*covers rows 4\.\.8, not the manifest's 4\.\.7"):
        merge(reply, out)


def test_a_job_that_is_not_row_sharded_or_also_sweeps_is_not_merged(tmp_path: Path) -> None:
    reply, out = signed_job(tmp_path, manifest=sharded_manifest({"batch_size": [8, 16]}))
    with pytest.raises(MergeError, match="sweeps parameters as well as sharding rows"):
        merge(reply, out)


def test_output_files_keep_their_extension_and_never_become_a_path() -> None:
    assert output_file_name("outputs", {"name": "outputs.safetensors"}) == "outputs.safetensors"
    assert output_file_name("weights", {"name": "weights.safetensors"}) == "weights.safetensors"
    assert output_file_name("outputs", {"name": "evil/../../x"}) == "outputs"
    hostile = output_file_name("../../.bashrc", {"name": "a.sh"})
    assert "/" not in hostile and hostile.startswith("output-") and hostile.endswith(".sh")


def test_a_task_id_that_is_not_plain_never_becomes_a_folder_path() -> None:
    assert task_dir_name("j0123456789abcdef0123.7") == "j0123456789abcdef0123.7"
    hostile = task_dir_name("../../home/user/.config")
    assert "/" not in hostile and hostile.startswith("task-")
    assert task_dir_name("..").startswith("task-")


def test_a_signed_result_under_a_task_id_outside_its_job_fails_verification(tmp_path: Path) -> None:
    reply, _ = signed_job(tmp_path)
    agent = Identity.generate()
    job_id = reply["job"]["id"]
    payload = {"task_id": "../../etc", "job_id": job_id, "agent_id": agent.id, "status": "ok", "values": {}}
    record = SignedRecord.sign(agent, payload)
    reply["results"].append({"task_id": "../../etc", "agent": agent.id, "record": record.to_wire(),
                             "digest": hashlib.sha256(record.payload).hexdigest(), "unit": 9, "state": "done"})
    checks = {c.task_id: c for c in verify_results(reply)}
    assert not checks["../../etc"].ok and "is not one of job" in checks["../../etc"].problem
    assert all(c.ok for tid, c in checks.items() if tid != "../../etc")
