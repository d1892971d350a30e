"""``panal bench shards``: what farming out inference over a big data set costs each agent.

A real hub (in this process, over TLS, with a middleware that counts every blob byte it serves, per
requesting key) and real agents (``panal agent run`` processes, one slot each); the data is a
safetensors file of ``data_mb`` MiB (tensor ``x``: float32 rows of ``FEATURES``), the model a tiny
``torch.export`` MLP, the job ``inference`` with ``shard: {by: rows, count: shards}``. Figures: the
bytes each agent downloaded (its requests at the hub), the peak RSS its worker reported per task,
the submit time (hash/split + upload) and the job's run time.

It uses only APIs that exist before and after shards became their own blobs, so the same file runs
against an older checkout for the comparison: ``PYTHONPATH=/old/checkout python agent/tools/bench_shards.py``.
Disk: the data file, its shards (a scratch folder, removed at exit), the hub's blobs and each agent's
cache, all under one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["BlobReads", "make_data", "make_model", "run_shard_bench"]

FEATURES = 64
_KEYID = re.compile(r'keyid="([^"]+)"')


class BlobReads:
    """An aiohttp middleware that counts, per signing key, the blob bytes the hub served (GET 200)."""

    def __init__(self, size_of: Callable[[str], int]) -> None:
        self.size_of = size_of
        self.bytes: Counter[str] = Counter()
        self.blobs: dict[str, list[str]] = {}
        self.uploads: Counter[str] = Counter()   # "chunk" (resumable) / "put" (one request per file)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "PUT" and response.status in (200, 201):
            self.uploads["chunk" if request.path.startswith("/v1/uploads/") else "put"] += 1
        if request.method == "GET" and request.path.startswith("/v1/blobs/") and response.status == 200:
            found = _KEYID.search(request.headers.get("Signature-Input", ""))
            key = found.group(1) if found else "?"
            sha = request.path.rsplit("/", 1)[1]
            self.blobs.setdefault(key, []).append(sha)
            self.bytes[key] += self.size_of(sha)
        return response


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """A safetensors file with tensor ``x`` (rows x FEATURES float32), written in steps (never in memory)."""
    import torch

    header = json.dumps({"x": {"dtype": "F32", "shape": [rows, FEATURES],
                               "data_offsets": [0, rows * FEATURES * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        done = 0
        while done < rows:
            n = min(65536, rows - done)
            f.write(torch.randn(n, FEATURES, generator=gen).numpy().tobytes())
            done += n


def make_model(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    torch.export.save(torch.export.export(model, (torch.randn(4, FEATURES),), dynamic_shapes=({0: batch},)),
                      str(path))


def _panal(home: Path, *args: str, popen: bool = False, log: Path | None = None) -> Any:
    env = {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", "PANAL_LAN_ENABLED": "false"}
    import agent  # the checkout whose code runs here (PYTHONPATH may name an older one): agents run it too

    root = Path(agent.__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "agent", *args]
    if popen:
        with open(log or os.devnull, "w") as out:   # the child keeps its own copy of the descriptor
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=root, timeout=120)


async def run_shard_bench(workdir: Path, data_mb: int, shards: int, agents: int, timeout_s: float = 1800,
                          batch_size: int = 65536, chunk_mb: int = 0,
                          commit_bytes: int | None = None) -> dict[str, Any]:
    """Run one sharded inference job over ``data_mb`` MiB on ``agents`` agents; return the figures.
    ``commit_bytes``: sign the manifest committed over this many bytes (jobs/committed.py; 0: always)."""
    from agent.client.board import BoardClient
    from agent.client.submitting import make_envelope, prepare_inputs, submit, upload_inputs, wait_job
    from hub.home import HubHome
    from hub.server import BoardServer
    from jobs.manifest_files import load_manifests
    from security.identity import Identity
    from security.tls import BoardAddress, server_context

    rows = data_mb * 2**20 // (FEATURES * 4)
    data, model = workdir / "data.safetensors", workdir / "model.pt2"
    make_data(data, rows)
    make_model(model)
    spec = workdir / "job.yaml"
    spec.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: shard-bench}\nspec:\n  task: inference\n"
                    f"  params: {{arch: export, input_key: x, batch_size: {batch_size}}}\n"
                    "  inputs:\n    model: model.pt2\n"
                    f"    data: {{path: data.safetensors, shard: {{by: rows, count: {shards}}}}}\n"
                    "  resources: {timeout: 30m, max_memory_gb: 16}\n")
    home = HubHome(workdir / "hub")
    home.init("127.0.0.1", 0)
    settings: dict[str, Any] = {"upload_chunk_bytes": chunk_mb * 2**20} if chunk_mb else {}
    config = home.config(bind="127.0.0.1", port=0, body_timeout_s=600.0, **settings)
    server = BoardServer(config, home.db_path, server_context(home.cert_path, home.tls_key_path))
    reads = BlobReads(server.blobs.size)
    server.app.middlewares.insert(0, reads.middleware)
    port = await server.start()
    url = home.address(config, port).join_url()
    procs: list[subprocess.Popen[bytes]] = []
    ids: dict[str, str] = {}
    try:
        for i in range(agents):
            ahome = workdir / f"agent{i}"
            await asyncio.to_thread(_panal, ahome, "agent", "join", url, "--name", f"a{i}")
            ids[_agent_id(ahome)] = f"a{i}"
            procs.append(_panal(ahome, "agent", "run", "--name", f"a{i}", "--slots", "1", "--threads", "1",
                                popen=True, log=workdir / f"agent{i}.log"))
        for i in range(agents):   # every agent polls before the job exists, so the tasks spread over them
            await _wait_polling(workdir / f"agent{i}", deadline=time.monotonic() + 300)
        user = Identity.generate()
        await server.add_submitter(user.public, "bench")

        async with BoardClient(BoardAddress.parse(url), user) as client:
            start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            t0 = time.perf_counter()
            [manifest] = load_manifests(spec)
            prepared, files = await asyncio.to_thread(prepare_inputs, manifest)
            t_prepare = time.perf_counter() - t0
            await upload_inputs(client, files)
            t_submit = time.perf_counter() - t0
            submit_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # hub included: same process
            envelope = make_envelope(user, prepared) if commit_bytes is None \
                else make_envelope(user, prepared, commit_bytes=commit_bytes)
            job = await submit(client, envelope)
            t1 = time.perf_counter()
            view = await wait_job(client, job["id"], timeout_s)
            t_run = time.perf_counter() - t1
            results = (await client.call("GET", f"/v1/jobs/{job['id']}/results"))["results"]
        inputs = prepared.source["spec"]["inputs"]
        needed_by_row = _data_blobs(inputs["data"])
        per_agent: dict[str, dict[str, Any]] = {}
        needed: dict[str, set[str]] = {}
        for row in results:
            name = ids.get(row["agent"], row["agent"][:8])
            entry = per_agent.setdefault(name, {"tasks": 0, "peak_rss_mb": []})
            entry["tasks"] += 1
            payload = _payload(row["record"])
            entry["peak_rss_mb"].append(round(float(payload.get("metrics", {}).get("peak_rss_mb", 0)), 1))
            start = int(payload.get("values", {}).get("row_start", 0))
            needed.setdefault(name, {inputs["model"]["blob"]}).add(needed_by_row.get(start, needed_by_row.get(0, "")))
        for key, name in ids.items():
            entry = per_agent.setdefault(name, {"tasks": 0, "peak_rss_mb": []})
            entry["downloaded_mb"] = round(reads.bytes[key] / 2**20, 2)
            entry["downloaded_bytes"] = reads.bytes[key]
            entry["fetched"] = sorted(reads.blobs.get(key, []))
            entry["needed"] = sorted(needed.get(name, set()))
        return {"data_mb": data_mb, "rows": rows, "shards": shards, "agents": agents, "state": view["state"],
                "data_file_bytes": data.stat().st_size,
                "upload_files": len(files), "prepare_s": round(t_prepare, 2), "submit_s": round(t_submit, 2),
                "run_s": round(t_run, 2), "submit_peak_rss_mb": round(submit_rss, 1),
                "rss_before_submit_mb": round(start_rss, 1), "upload_requests": dict(reads.uploads),
                "per_agent": per_agent}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
        await server.stop(drain=False)


async def _wait_polling(home: Path, deadline: float) -> None:
    """Until the agent says over its control socket that it registered with its board (it polls from then)."""
    while time.monotonic() < deadline:
        out = await asyncio.to_thread(_panal_status, home)
        if out and all(b.get("registered") for b in out.get("boards", [])) and out.get("boards"):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"agent {home.name} did not start polling")


def _panal_status(home: Path) -> dict[str, Any] | None:
    try:
        done = _panal(home, "agent", "status", "--json")
    except subprocess.CalledProcessError:
        return None
    value: dict[str, Any] = json.loads(done.stdout)
    return value


def _data_blobs(ref: dict[str, Any]) -> dict[int, str]:
    """Row where each data blob starts -> its sha256: the shards' (split in blobs) or the one whole file."""
    if "shards" not in ref:
        return {0: str(ref["blob"])}
    out, start = {}, 0
    for shard in ref["shards"]:
        out[start] = str(shard["blob"])
        start += int(shard["rows"])
    return out


def _agent_id(home: Path) -> str:
    from security.identity import Identity

    return str(Identity.load(home / "agent.key").id)


def _payload(record: Any) -> dict[str, Any]:
    from security.records import SignedRecord

    value: dict[str, Any] = SignedRecord.from_wire(record).verify()
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--data-mb", type=int, default=512)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--chunk-mb", type=int, default=0, help="the hub's upload_chunk_bytes in MiB (0: its default)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="panal-shard-bench-", dir=args.dir))
    try:
        print(json.dumps(asyncio.run(run_shard_bench(work, args.data_mb, args.shards, args.agents,
                                                              chunk_mb=args.chunk_mb)), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
