"""Bytes per lease reply and hub RSS with a big job's envelope sent once per agent (``LeaseRequest.have``):
fetched (the default for a big one), or inline once; against every assignment carrying it (agents that send
no ``have``, as every agent did before).

``PYTHONPATH=. .venv/bin/python benchmarks/bench_envelopes.py [--agents 200] [--tasks 100000] [--slots 4]
[--seconds 30] [--modes committed,fetch,inline,none]`` runs, per mode, a real ``panal hub serve`` process (TLS,
signed requests, SQLite) and N light simulated agents (``agent/tools/bench_fleet.py`` ``FleetAgent``, spread over
two load processes), submits one ``sleep 0`` job of ``tasks`` tasks (its envelope ~9 bytes per task) and lets the fleet
drain it for ``seconds``. It reports the hub's RSS (idle with the fleet connected, peak while leasing, sampled
every 0.2 s), the lease replies' body sizes (msgpack, as sent; replies that brought tasks), envelopes received
per agent and tasks done. A run whose hub passes ``--rss-cap-mb`` is stopped there (and says so): the
every-envelope mode on a big fleet can take the machine's memory.

``committed`` signs the job as ``panal submit`` does now (jobs/committed.py: a head and the Merkle root of its units,
each assignment with its unit's proof); the other modes sign it whole, as clients did before. Every agent checks
every task with the agent's own ManifestCache. Compare the modes of one run (same machine, same load); the figures
move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from agent.client.board import BoardClient  # noqa: E402
from agent.client.submitting import make_envelope, submit  # noqa: E402
from agent.tools.bench_fleet import FleetAgent, run_until_told  # noqa: E402
from agent.tools.demo import start_hub, stop  # noqa: E402
from jobs.manifest import Manifest  # noqa: E402
from jobs.protocol import LeaseReply, LeaseRequest  # noqa: E402
from jobs.wire import MSGPACK, encode_body  # noqa: E402
from security.identity import Identity  # noqa: E402
from security.tls import BoardAddress  # noqa: E402

__all__ = ["main"]


class CountingAgent(FleetAgent):
    """A fleet agent that records each lease reply's body size and the envelopes it received."""

    def __init__(self, address: BoardAddress, slots: int, have: bool) -> None:
        super().__init__(address, slots, gpu=False, have=have)
        self.reply_bytes: list[int] = []
        self.envelopes = 0
        self.fetched_bytes = 0
        self.done_tasks = 0

    async def run(self, stop_at: asyncio.Event) -> None:
        results: tuple[Any, ...] = ()
        while not stop_at.is_set():
            request = LeaseRequest(self.slots, self.poll_wait_s, results, self.holding())
            reply = await self.client.post("/v1/lease", request,
                                           LeaseReply.decode, timeout_s=self.poll_wait_s + 120.0)
            if reply.tasks:   # a decoded record encodes to the bytes it came as (jobs/protocol.py)
                self.reply_bytes.append(len(encode_body(reply.encode(), MSGPACK)))
            self.envelopes += sum(1 for t in reply.tasks if t.envelope is not None)
            fetched = await self.hold_envelopes(reply)
            self.envelopes += fetched > 0
            self.fetched_bytes += fetched
            if not reply.tasks and reply.retry_after_s:
                await asyncio.sleep(reply.retry_after_s)
            self.done_tasks += len(results)
            results = tuple(self._result(t) for t in reply.tasks)


async def _load(url: str, count: int, slots: int, have: bool, conn: Connection) -> None:
    address = BoardAddress.parse(url)
    agents = [CountingAgent(address, slots, have) for _ in range(count)]
    errors = [f"{type(e).__name__}: {e}" for e in await run_until_told(agents, conn, gate=32)]
    conn.send({"reply_bytes": [b for a in agents for b in a.reply_bytes],
               "envelopes": [a.envelopes for a in agents], "fetched": sum(a.fetched_bytes for a in agents),
               "done": sum(a.done_tasks for a in agents), "refused": sum(a.refused for a in agents),
               "proofs": sum(a.proofs for a in agents), "proof_bytes": sum(a.proof_bytes for a in agents),
               "errors": errors[:5]})


def _load_process(url: str, count: int, slots: int, have: bool, conn: Connection) -> None:
    _raise_fd_limit()
    asyncio.run(_load(url, count, slots, have, conn))


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _manifest(n_tasks: int) -> Manifest:
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "envelopes"},
                               "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * n_tasks}}}, max_tasks=n_tasks)


def _pct(values: list[int], q: float) -> int | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else None


async def _drive(url: str, user: Identity, hub: psutil.Process, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"hub_rss_mb_idle": round(hub.memory_info().rss / 2**20, 1)}
    async with BoardClient(BoardAddress.parse(url), user, retry_for_s=120.0) as client:
        envelope = make_envelope(user, _manifest(args.tasks), **({} if args.mode == "committed"
                                                                  else {"commit_bytes": 1 << 40}))
        out["envelope_bytes"] = len(encode_body(envelope, MSGPACK))
        await submit(client, envelope)
    peak, t0, capped = 0, time.perf_counter(), False
    while time.perf_counter() - t0 < args.seconds:
        rss = hub.memory_info().rss
        peak = max(peak, rss)
        if rss > args.rss_cap_mb * 2**20:
            capped = True
            break
        await asyncio.sleep(0.2)
    out["hub_rss_mb_peak"] = round(peak / 2**20, 1)
    out["stopped_at_rss_cap"] = capped
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


MODES = {"committed": "have; the manifest signed committed (head + units root), a proof in each assignment",
         "fetch": "have; a big envelope fetched (GET /v1/jobs/{id}/envelope), the default",
         "inline": "have; every envelope inline, once per agent (inline_envelope_bytes 16 MiB)",
         "none": "no have: every assignment carries its envelope (agents and boards before have)"}


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    have = mode != "none"
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="panal-envelopes-") as tmp:
        user_home = Path(tmp) / "user"
        headroom = 2 * args.agents + 256
        proc, url = start_hub(Path(tmp) / "hub", user_home, settings={
            "max_tasks_per_job": max(args.tasks, 10_000), "max_connections": max(4096, headroom),
            "max_long_polls": max(2048, headroom),
            # "none": as before ``have``, when the board inlined every envelope (it no longer inlines a big one for
            # an agent that sends no ``have``, so the old behaviour needs the inline limit raised too)
            **({"inline_envelope_bytes": 16 * 2**20} if mode in ("inline", "none") else {})})
        loads: list[tuple[Any, Connection]] = []
        try:
            per = [args.agents // 2 + (i < args.agents % 2) for i in range(2)]
            for count in per:
                mine, theirs = ctx.Pipe()
                load = ctx.Process(target=_load_process, args=(url, count, args.slots, have, theirs), daemon=True)
                load.start()
                theirs.close()
                loads.append((load, mine))
            for _, conn in loads:
                conn.recv()
            user = Identity.load(user_home / "user.key")
            out = asyncio.run(_drive(url, user, psutil.Process(proc.pid), argparse.Namespace(**vars(args), mode=mode)))
            reports = []
            for _, conn in loads:
                conn.send("stop")
                reports.append(conn.recv())
        finally:
            for load, conn in loads:
                load.join(timeout=60)
                if load.is_alive():
                    load.kill()
                conn.close()
            with contextlib.suppress(Exception):
                stop([proc])
            if proc.stdout is not None:
                proc.stdout.close()
    sizes = [b for r in reports for b in r["reply_bytes"]]
    envelopes = [n for r in reports for n in r["envelopes"]]
    return out | {"mode": mode, "what": MODES[mode], "envelope_bytes_fetched": sum(r["fetched"] for r in reports),
                  "replies_with_tasks": len(sizes), "tasks_done": sum(r["done"] for r in reports),
                  "reply_bytes_median": int(statistics.median(sizes)) if sizes else None,
                  "reply_bytes_p99": _pct(sizes, 0.99),
                  "reply_bytes_mean": int(statistics.fmean(sizes)) if sizes else None,
                  "envelopes_per_agent_max": max(envelopes, default=0),
                  "envelopes_total": sum(envelopes), "tasks_refused": sum(r["refused"] for r in reports),
                  "proof_bytes_per_assignment": round(sum(r["proof_bytes"] for r in reports) / proofs, 1)
                  if (proofs := sum(r["proofs"] for r in reports)) else None,
                  "agent_errors": [e for r in reports for e in r["errors"]][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rss-cap-mb", type=float, default=6000.0)
    parser.add_argument("--modes", default="committed,fetch,inline,none",
                        help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    _raise_fd_limit()
    runs = [run_mode(args, mode) for mode in args.modes.split(",")]
    print(json.dumps({"agents": args.agents, "tasks": args.tasks, "slots": args.slots, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
