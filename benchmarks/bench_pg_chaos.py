"""`panal bench chaos` on SQLite and on PostgreSQL in one run, PostgreSQL on this machine's cores.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_pg_chaos.py [--minutes 3] [--agents 3] [--seed N]``
starts a private PostgreSQL server (tests/pgserver.py: initdb/pg_ctl from the postgresql package, fsync
ON, as a production server runs), gives the soak an empty database of its own, and runs
``panal bench chaos --store sqlite`` then ``--store URL`` with the same seed (the same schedule of
kills and freezes, as far as timing lets the same seed replay). Prints both reports as JSON. The
issue's goal: 0 lost, 0 duplicated on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgserver import PgServer  # the test suite's private-server helper


def _soak(minutes: float, agents: int, seed: int, store: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "agent", "bench", "chaos", "--minutes", str(minutes), "--agents",
                           str(agents), "--seed", str(seed), "--store", store, "--json"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench chaos --store {store} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    server = PgServer(fsync=True).start()
    try:
        runs = {"sqlite": _soak(args.minutes, args.agents, seed, "sqlite"),
                "postgresql": _soak(args.minutes, args.agents, seed, server.url(server.database()))}
    finally:
        server.destroy()
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
