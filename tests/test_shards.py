"""Shards as their own blobs: a row-sharded input is split at submit, the signed manifest binds every shard's
digest to its rows, a task picks exactly its shard, and an agent downloads nothing else."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from helpers import scaled
from safetensors.torch import load_file, save_file
from test_examples import run_points

from agent.client.blobcache import hash_file
from agent.client.submitting import prepare_inputs
from agent.tools.bench_shards import make_data, make_model, run_shard_bench
from jobs.inputs import input_blob
from jobs.kinds.inference import shard_rows
from jobs.manifest import Manifest, ManifestError
from jobs.manifest_files import load_manifests
from jobs.safeload import UnsafeInput
from jobs.shardfiles import read_rows, split_rows
from security.errors import BadRequest

ROOT = Path(__file__).resolve().parents[1]
HEAD = "apiVersion: panal/v1\nkind: Job\nmetadata: {name: s}\nspec:\n  task: inference\n  params: {input_key: x}\n"


def two_tensor_file(path: Path, rows: int) -> dict[str, torch.Tensor]:
    tensors = {"x": torch.randn(rows, 3, 2), "label": torch.arange(rows, dtype=torch.int64)}
    save_file(tensors, str(path), {"source": "test"})
    return tensors


def test_split_shards_are_valid_safetensors_holding_exactly_their_rows(tmp_path: Path) -> None:
    tensors = two_tensor_file(tmp_path / "data.safetensors", 10)
    bounds = [shard_rows(10, 3, i) for i in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    shards = split_rows(tmp_path / "data.safetensors", bounds, out)
    assert [(s.start, s.end) for s in shards] == [(0, 4), (4, 7), (7, 10)]
    for shard in shards:
        loaded = load_file(str(shard.path))           # the safetensors library reads each as a file of its own
        assert set(loaded) == {"x", "label"}
        for name, whole in tensors.items():
            assert torch.equal(loaded[name], whole[shard.start:shard.end])
        assert hash_file(shard.path) == (shard.sha256, shard.size)
        with shard.path.open("rb") as f:                  # the metadata travels with every shard
            assert b'"source":"test"' in f.read(200)


def test_a_file_whose_tensors_differ_in_rows_is_refused_by_name(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(5, 2), "w": torch.zeros(3)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(UnsafeInput, match="same number of rows"):
        split_rows(tmp_path / "d.safetensors", [(0, 5)], tmp_path)


def test_read_rows_reads_a_range_equal_to_the_slice(tmp_path: Path) -> None:
    tensors = two_tensor_file(tmp_path / "d.safetensors", 9)
    assert torch.equal(read_rows(tmp_path / "d.safetensors", "x", 2, 7), tensors["x"][2:7])


def sharded_manifest(tmp_path: Path, rows: int, count: int) -> Manifest:
    make_data(tmp_path / "data.safetensors", rows)
    make_model(tmp_path / "model.pt2")
    (tmp_path / "job.yaml").write_text(HEAD + "  inputs:\n    model: model.pt2\n"
                                       f"    data: {{path: data.safetensors, shard: {{by: rows, count: {count}}}}}\n")
    [manifest] = load_manifests(tmp_path / "job.yaml")
    return manifest


def test_the_signed_manifest_binds_each_shard_digest_to_its_rows_and_a_task_picks_its_own(tmp_path: Path) -> None:
    prepared, files = prepare_inputs(sharded_manifest(tmp_path, 10, 3))
    ref = prepared.inputs["data"]
    assert ref.shards is not None and ref.blob is None and [s.rows for s in ref.shards] == [4, 3, 3]
    assert {sha for sha, _ in files} >= {s.blob for s in ref.shards}
    points = prepared.points()
    assert [(p["row_start"], p["row_end"], p["data_offset"]) for p in points] == [(0, 4, 0), (4, 7, 4), (7, 10, 7)]
    assert [input_blob(ref, p) for p in points] == [s.blob for s in ref.shards]
    # a task whose rows are not one shard's gets no blob (a board that mixes them up is caught)
    with pytest.raises(BadRequest, match=r"no shard holds rows 4\.\.10"):
        input_blob(ref, {**points[1], "row_end": 10})
    # the shard list must add up, and match the count
    source = json.loads(json.dumps(prepared.source))
    source["spec"]["inputs"]["data"]["rows"] = 11
    source["spec"]["inputs"]["data"]["shard"]["count"] = 4
    with pytest.raises(ManifestError) as bad:
        Manifest.from_dict(source)
    assert "3 shard blobs for shard.count 4" in str(bad.value) and "hold 10 rows, not 11" in str(bad.value)


def test_a_task_over_its_shard_blob_computes_what_the_whole_file_gives(tmp_path: Path) -> None:
    prepared, files = prepare_inputs(sharded_manifest(tmp_path, 50, 3))
    ref = prepared.inputs["data"]
    by_sha = dict(files)
    model = tmp_path / "model.pt2"
    for params in prepared.points():
        [split] = run_points("inference", [params], tmp_path / f"s{params['row_start']}", model=model,
                             data=by_sha[input_blob(ref, params)])
        [whole] = run_points("inference", [{**params, "data_offset": 0}], tmp_path / f"w{params['row_start']}",
                             model=model, data=tmp_path / "data.safetensors")   # how an older manifest runs
        assert torch.equal(load_file(str(split.files["outputs"]))["y"], load_file(str(whole.files["outputs"]))["y"])
        assert split.values["row_start"] == params["row_start"]


def test_a_list_of_files_is_the_shard_set_in_sorted_order(tmp_path: Path) -> None:
    parts = {name: torch.randn(rows, 4) for name, rows in (("part-b", 2), ("part-a", 3), ("part-c", 4))}
    for name, x in parts.items():
        save_file({"x": x}, str(tmp_path / f"{name}.safetensors"))
    make_model(tmp_path / "model.pt2")
    (tmp_path / "job.yaml").write_text(HEAD + "  inputs:\n    model: model.pt2\n"
                                       "    data: {paths: ['part-*.safetensors']}\n")
    [manifest] = load_manifests(tmp_path / "job.yaml")
    prepared, _ = prepare_inputs(manifest)
    ref = prepared.inputs["data"]
    assert ref.shards is not None and [s.rows for s in ref.shards] == [3, 2, 4]   # part-a, part-b, part-c
    assert [s.blob for s in ref.shards] == [hash_file(tmp_path / f"{n}.safetensors")[0]
                                            for n in ("part-a", "part-b", "part-c")]
    assert [(p["row_start"], p["row_end"]) for p in prepared.points()] == [(0, 3), (3, 5), (5, 9)]
    (tmp_path / "none.yaml").write_text(HEAD + "  inputs:\n    model: model.pt2\n    data: {paths: [nope-*.st]}\n")
    with pytest.raises(ManifestError, match=r"spec\.inputs\.data\.paths\[0\].*no file matches 'nope-\*\.st'"):
        load_manifests(tmp_path / "none.yaml")


@pytest.mark.slow
@pytest.mark.timeout(scaled(400))
def test_each_agent_downloads_only_the_shards_of_its_own_tasks(tmp_path: Path) -> None:
    """Two real agents against a hub that counts every blob byte it serves, per requesting key."""
    figures = asyncio.run(run_shard_bench(tmp_path, data_mb=1, shards=4, agents=2, timeout_s=scaled(300)))
    assert figures["state"] == "succeeded" and figures["upload_files"] == 5   # the model + 4 shards
    ran = [a for a in figures["per_agent"].values() if a["tasks"]]
    assert sum(a["tasks"] for a in ran) == 4
    for agent in figures["per_agent"].values():
        assert agent["fetched"] == agent["needed"]            # its shards and the model, each once, nothing else
        assert len(agent["fetched"]) == (agent["tasks"] + 1 if agent["tasks"] else 0)   # one shard per task
    assert sum(a["downloaded_bytes"] for a in ran) < figures["data_file_bytes"] * 1.1 + 2 * 10**5


def test_every_shard_blob_is_referenced_by_the_job_so_gc_and_reading_rights_cover_it(tmp_path: Path) -> None:
    from agent.client.submitting import make_envelope
    from hub.blob_refs import manifest_blobs
    from security.identity import Identity

    prepared, _ = prepare_inputs(sharded_manifest(tmp_path, 10, 3))
    ref = prepared.inputs["data"]
    assert ref.shards is not None
    envelope = make_envelope(Identity.generate(), prepared)
    assert manifest_blobs(envelope) == {s.blob for s in ref.shards} | {prepared.inputs["model"].blob}


def test_a_manifest_signed_before_shard_blobs_still_runs_from_the_whole_file() -> None:
    old = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "old"}, "spec": {
        "task": "inference", "inputs": {
            "model": {"blob": "a" * 64, "size": 10, "name": "model.pt2"},
            "data": {"blob": "b" * 64, "size": 99, "name": "data.safetensors", "rows": 10,
                     "shard": {"by": "rows", "count": 3}}}}})
    points = old.points()
    assert [(p["row_start"], p["row_end"], p["data_offset"]) for p in points] == [(0, 4, 0), (4, 7, 0), (7, 10, 0)]
    assert {input_blob(old.inputs["data"], p) for p in points} == {"b" * 64}


async def test_an_agent_leasing_a_task_may_read_its_shard_and_no_other(tmp_path: Path) -> None:
    from conftest import InProcessHub
    from test_blob_access import blob_request, member

    from agent.client.submitting import make_envelope, submit, upload_inputs

    hub = InProcessHub(tmp_path / "board", blob_gc_interval_s=3600)
    await hub.start()
    try:
        sub, worker = await member(hub, "submitter"), await member(hub, "agent")
        prepared, files = prepare_inputs(sharded_manifest(tmp_path, 10, 3))
        await upload_inputs(sub, files)
        await submit(sub, make_envelope(sub.identity, prepared))
        [task] = (await worker.call("POST", "/v1/lease", {"slots": 1, "wait_s": 2}))["tasks"]
        ref = prepared.inputs["data"]
        assert ref.shards is not None
        mine = input_blob(ref, task["params"])
        assert (await blob_request(worker, "GET", mine))[0] == 200
        assert (await blob_request(worker, "GET", prepared.inputs["model"].blob or ""))[0] == 200
        for other in {s.blob for s in ref.shards} - {mine}:
            assert (await blob_request(worker, "GET", other))[0] == 404
        for client in (sub, worker):
            await client.close()
    finally:
        await hub.stop()


def test_submit_time_checks_read_every_file_of_a_shard_set_and_name_it(tmp_path: Path) -> None:
    from jobs.precheck import check_local_inputs

    save_file({"x": torch.randn(3, 4)}, str(tmp_path / "part-a.safetensors"))
    save_file({"features": torch.randn(3, 4)}, str(tmp_path / "part-b.safetensors"))
    save_file({"x": torch.randn(0, 4)}, str(tmp_path / "part-c.safetensors"))
    make_model(tmp_path / "model.pt2")
    (tmp_path / "job.yaml").write_text(HEAD + "  inputs:\n    model: model.pt2\n"
                                       "    data: {paths: ['part-*.safetensors']}\n")
    [manifest] = load_manifests(tmp_path / "job.yaml")
    problems = check_local_inputs(manifest)
    assert [(where, text.split(":")[0]) for where, text in problems] == [
        ("spec.inputs.data", "part-b.safetensors"), ("spec.inputs.data", "part-c.safetensors")]
    assert "has no tensor 'x'" in problems[0][1] and "no rows" in problems[1][1]
