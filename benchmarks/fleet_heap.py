"""Where a hub's memory goes per connected, long-polling agent: a tracemalloc diff and RSS, before and after.

``PYTHONPATH=. .venv/bin/python benchmarks/fleet_heap.py [--agents 1000] [--procs 2] [--settle-s 30] [--top 25]``

starts a real hub (``panal hub serve`` under this script, with ``tracemalloc`` on), takes a heap snapshot with
no agent connected, connects N simulated agents (``agent/tools/bench_fleet.py``'s load processes: real TLS,
signed registration, 20 s long-polls), waits ``--settle-s``, takes a second snapshot and prints:

- the hub's RSS before and after, per agent, and how much of it Python's allocator traced: the rest is C
  memory Python does not see (OpenSSL's per-connection state, the allocator's own overhead);
- the top allocation sites of the difference, per agent (by source line, then the biggest with a traceback).

A developer's tool for finding what to cut (tracemalloc slows the hub several times: never a figure to
report as throughput; the RSS figures of ``panal bench fleet`` are the ones to report).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

__all__ = ["main"]

_FRAMES = 12


def _serve(directory: str) -> None:
    """The hub process: tracemalloc on, SIGUSR1 writes snapshot N to ``directory/heap-N.snap``."""
    tracemalloc.start(_FRAMES)
    taken = [0]

    def dump(_signum: int, _frame: object) -> None:
        taken[0] += 1
        path = Path(directory) / f"heap-{taken[0]}.snap"
        tracemalloc.take_snapshot().dump(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    signal.signal(signal.SIGUSR1, dump)
    from agent.cli import main as cli
    sys.argv = ["panal", "hub", "serve", "--dir", directory, "--port", "0", "--bind", "127.0.0.1"]
    cli()


def _snapshot(pid: int, directory: Path, n: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = directory / f"heap-{n}.snap"
    deadline = time.monotonic() + 600
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the hub wrote no heap snapshot")
        time.sleep(0.5)
    return tracemalloc.Snapshot.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=30.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import subprocess

    import psutil

    from agent.tools import bench_fleet
    from agent.tools.demo import _env, panal_cli

    with tempfile.TemporaryDirectory(prefix="panal-heap-") as tmp:
        root, home = Path(tmp) / "hub", Path(tmp) / "user"
        panal_cli("hub", "init", "--dir", str(root), "--host", "127.0.0.1", home=home)
        from hub.home import HubHome
        HubHome(root).configure(max_connections=2 * args.agents + 256, max_long_polls=2 * args.agents + 256)
        hub = subprocess.Popen([sys.executable, __file__, "--serve", str(root)], env=_env(home),
                               stdout=subprocess.PIPE, text=True)
        assert hub.stdout is not None
        line = hub.stdout.readline()
        if "serving at" not in line:
            raise SystemExit(f"the hub did not start: {line!r}")
        url = line.split("serving at", 1)[1].strip()
        loads: list[tuple[Any, Any]] = []          # (load process, its pipe)
        try:
            proc = psutil.Process(hub.pid)
            before, rss0 = _snapshot(hub.pid, root, 1), proc.memory_info().rss
            ctx = multiprocessing.get_context("spawn")
            per = [args.agents // args.procs + (i < args.agents % args.procs) for i in range(args.procs)]
            for count in per:
                mine, theirs = ctx.Pipe()
                load = ctx.Process(target=bench_fleet._load_process, args=(url, count, 0, 4, theirs), daemon=True)
                load.start()
                theirs.close()
                loads.append((load, mine))
            for _, conn in loads:
                conn.recv()       # "registered"
            time.sleep(args.settle_s)
            rss1 = proc.memory_info().rss
            after = _snapshot(hub.pid, root, 2)
            _report(before, after, rss0, rss1, args.agents, args.top)
        finally:
            for running, conn in loads:
                conn.send("stop")
                conn.recv()
                running.join(30)
            hub.send_signal(signal.SIGTERM)
            hub.wait(60)


def _report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, rss0: int, rss1: int, agents: int,
            top: int) -> None:
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(skip), after.filter_traces(skip)
    lines = after.compare_to(before, "lineno")
    traced = sum(d.size_diff for d in lines)
    print(f"hub RSS {rss0 / 2**20:.1f} MB -> {rss1 / 2**20:.1f} MB with {agents} agents: "
          f"{(rss1 - rss0) / agents / 1024:.1f} KB per agent; traced by Python: {traced / agents / 1024:.1f} KB "
          f"per agent; untraced (C: OpenSSL, allocator): {(rss1 - rss0 - traced) / agents / 1024:.1f} KB per agent")
    print(f"\ntop {top} sites (bytes per agent, allocations per agent):")
    for diff in lines[:top]:
        frame = diff.traceback[0]
        print(f"{diff.size_diff / agents:9.0f} B {diff.count_diff / agents:7.2f}  {frame.filename}:{frame.lineno}")
    print("\nthe five biggest with their tracebacks:")
    for diff in after.compare_to(before, "traceback")[:5]:
        print(f"\n{diff.size_diff / agents:.0f} B per agent:")
        for text in diff.traceback.format()[-2 * _FRAMES:]:
            print("   ", text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(sys.argv[2])
    else:
        main()
