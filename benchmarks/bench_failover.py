"""Failover time of two hubs on one PostgreSQL database: from `kill -9` of the active hub to the first
result the standby accepts.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_failover.py [--rounds 5] [--agents 2]`` starts a private
PostgreSQL server (tests/pgserver.py: initdb + pg_ctl), then per round, on a fresh database: two real
``panal hub serve`` processes (hub-a, then hub-b once hub-a is active; default election settings), real
agents (``panal agent run --slots 2``, LAN off) joined with the join URL that names both hubs, and a job
of short ``sleep`` tasks. Once results flow, hub-a is killed with SIGKILL; the round measures

- ``takeover_s``: kill -> hub-b's takeover (``panal_active.since``, written when it wins the lock);
- ``failover_s``: kill -> the first result accepted after the kill (``results.accepted_at``; only hub-b
  is alive to accept it), which includes the agents noticing and moving to hub-b.

Output: one JSON object with every round and the medians. Clocks: one machine, so both hubs' clocks are
this one. Numbers depend on the machine's load: report the median, compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pgserver import PgServer  # noqa: E402  (the tests' private-server starter)

__all__ = ["main"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", "PANAL_LAN_ENABLED": "false",
            "PANAL_WORKER_PRELOAD": "0", **extra}


def _panal(*args: str, home: Path, **env: str) -> str:
    return subprocess.run([sys.executable, "-m", "agent", *args], env=_env(home, **env), check=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=120).stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _fetchval(dsn: str, sql: str, *args: Any) -> Any:
    """One value, or None while the table is not there yet (the first hub creates panal_active)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


def _wait(check: Any, what: str, timeout_s: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def one_round(work: Path, dsn: str, agents: int) -> dict[str, float]:
    user = work / "user"
    hubs: dict[str, tuple[Path, int, dict[str, str]]] = {}
    for name in ("hub-a", "hub-b"):
        env = {"PANAL_HUB_STORE": dsn, "PANAL_HUB_BLOBS_DIR": str(work / "blobs"), "PANAL_HUB_HUB_ID": name,
               "PANAL_HUB_DRAIN_TIMEOUT_S": "1"}
        port = _free_port()
        _panal("hub", "init", "--dir", str(work / name), "--port", str(port), home=user, **env)
        hubs[name] = (work / name, port, env)
    urls = {n: _panal("hub", "url", "--dir", str(d), home=user, **e).strip() for n, (d, _, e) in hubs.items()}
    procs: list[subprocess.Popen[str]] = []
    logs = work / "logs"
    logs.mkdir()

    def start(*args: str, home: Path, log: str, **env: str) -> subprocess.Popen[str]:
        with open(logs / log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "agent", *args], env=_env(home, **env), text=True,
                                    stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        procs.append(proc)
        return proc

    def serve(name: str, peer: str) -> tuple[subprocess.Popen[str], str]:
        d, port, env = hubs[name]
        proc = start("hub", "serve", "--dir", str(d), "--port", str(port), "--bind", "127.0.0.1", home=user,
                     log=name, PANAL_HUB_PEER_URLS=urls[peer], **env)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().split("serving at", 1)[1].split(" (")[0].strip()

    try:
        hub_a, join_url = serve("hub-a", "hub-b")
        _wait(lambda: asyncio.run(_fetchval(dsn, "SELECT hub FROM panal_active")) == "hub-a", "hub-a active")
        serve("hub-b", "hub-a")
        for i in range(agents):
            home = work / f"agent{i}"
            _panal("agent", "join", join_url, "--name", f"a{i}", home=home)
            start("agent", "run", "--slots", "2", "--no-lan", "--drain", "1", home=home, log=f"agent{i}")
        manifest = work / "job.yaml"
        manifest.write_text(json.dumps({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "failover"},
                                        "spec": {"task": "sleep", "sweep": {"seconds": [0.3] * 400},
                                                 "policy": {"retries": 5}}}))
        _panal("submit", str(manifest), "--hub", join_url, home=user)
        _wait(lambda: asyncio.run(_fetchval(dsn, "SELECT count(*) FROM results")) >= 4, "results to flow")
        killed_at = time.time()
        hub_a.send_signal(signal.SIGKILL)
        hub_a.wait()
        first = _wait(lambda: asyncio.run(_fetchval(dsn, "SELECT min(accepted_at) FROM results WHERE "
                                                         "accepted_at > $1", killed_at)), "a result on hub-b")
        since = asyncio.run(_fetchval(dsn, "SELECT since FROM panal_active WHERE hub = 'hub-b'"))
        return {"takeover_s": round(float(since) - killed_at, 3), "failover_s": round(float(first) - killed_at, 3)}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--agents", type=int, default=2)
    args = parser.parse_args()
    server = PgServer().start()
    rounds: list[dict[str, float]] = []
    try:
        for _ in range(args.rounds):
            db = server.database()
            with tempfile.TemporaryDirectory(prefix="panal-failover-") as tmp:
                rounds.append(one_round(Path(tmp), server.url(db), args.agents))
            server.drop(db)
            print(json.dumps(rounds[-1]), file=sys.stderr)
    finally:
        server.destroy()
    print(json.dumps({"rounds": rounds,
                      "median_takeover_s": statistics.median(r["takeover_s"] for r in rounds),
                      "median_failover_s": statistics.median(r["failover_s"] for r in rounds)}, indent=2))


if __name__ == "__main__":
    main()
