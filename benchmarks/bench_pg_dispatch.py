"""`panal bench dispatch` on SQLite and on PostgreSQL in one run, PostgreSQL on this machine's cores.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_pg_dispatch.py [--agents 20] [--tasks 5000] [--rounds 2]``
starts a private PostgreSQL server (tests/pgserver.py: initdb/pg_ctl from the postgresql package, fsync
ON, as a production server runs) and runs ``panal bench dispatch --store sqlite --store URL`` ``--rounds``
times, alternating which store goes first (a busy machine drifts; alternating cancels the drift), each
PostgreSQL run on an empty database of its own. Prints each round's figures and the median
PostgreSQL/SQLite throughput ratio as JSON. The issue's goal: PostgreSQL >= 50% of SQLite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgserver import PgServer  # the test suite's private-server helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=50)
    args = parser.parse_args()
    server = PgServer(fsync=True).start()
    rounds, ratios = [], []
    try:
        for i in range(args.rounds):
            url = server.url(server.database())
            order = ["sqlite", url] if i % 2 == 0 else [url, "sqlite"]
            proc = subprocess.run(
                [sys.executable, "-m", "agent", "bench", "dispatch", "--agents", str(args.agents), "--tasks",
                 str(args.tasks), "--slots", str(args.slots), "--latency-samples", str(args.latency_samples),
                 "--json", *(a for store in order for a in ("--store", store))],
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"bench dispatch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            runs = json.loads(proc.stdout)
            pg = next(v for k, v in runs.items() if k.startswith("postgresql"))
            lite = runs["sqlite (default)"]
            ratios.append(pg["tasks_per_s"] / lite["tasks_per_s"])
            rounds.append({"first": "sqlite" if i % 2 == 0 else "postgresql",
                           **{f"{name}_{key}": run[key] for name, run in (("sqlite", lite), ("postgresql", pg))
                              for key in ("tasks_per_s", "latency_ms_p50", "latency_ms_p99", "hub_cpu_ms_per_task")}})
    finally:
        server.destroy()
    print(json.dumps({"rounds": rounds, "pg_vs_sqlite_throughput_median": round(statistics.median(ratios), 3)},
                     indent=2))


if __name__ == "__main__":
    main()
