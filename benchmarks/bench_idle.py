"""How heavy an idle agent is, and how long its first task waits after a quiet spell.

``PYTHONPATH=. .venv/bin/python benchmarks/bench_idle.py [--idle-s 60] [--worker-idle-minutes 0.25]``
starts a real hub (``panal hub serve``) and a real agent (``panal agent run --slots 1``, LAN off) in
a temporary home, waits until the agent polls its board, then measures:

- idle RSS of the agent's process tree (daemon + workers), and of the daemon alone;
- idle CPU: CPU seconds the tree used over ``--idle-s`` seconds, scaled to one hour;
- first-task latency from cold: ``panal submit --wait`` of a ``sleep 0`` job after the idle spell,
  then a second one right after (warm), both wall-clock seconds including the CLI.

``--worker-idle-minutes`` is written to the agent's ``worker_idle_minutes`` preference (when the
agent knows it) so the idle spell is longer than the worker's idle exit. Output: one JSON object.
Numbers depend on the machine and its load: compare runs on one machine, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", "PANAL_LAN_ENABLED": "false"}


def _panal(home: Path, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "agent", *args], env=_env(home), text=True, capture_output=True,
                          timeout=timeout, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"panal {' '.join(args)} failed: {done.stdout}\n{done.stderr}")
    return done.stdout


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _wait(what: str, check: Any, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _polling(home: Path) -> bool:
    done = subprocess.run([sys.executable, "-m", "agent", "agent", "status", "--json"], env=_env(home), text=True,
                          capture_output=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        return False
    boards = json.loads(done.stdout).get("boards") or []
    return bool(boards) and all(b.get("registered") for b in boards)


def _submit_sleep(user: Path, url: str, manifest: Path) -> float:
    started = time.perf_counter()
    _panal(user, "submit", str(manifest), "--hub", url, "--wait", "--json")
    return round(time.perf_counter() - started, 2)


def measure(tmp: Path, idle_s: float, worker_idle_minutes: str | None) -> dict[str, Any]:
    user, agent_home, hub_dir = tmp / "user", tmp / "agent", tmp / "hub"
    _panal(user, "hub", "init", "--dir", str(hub_dir))
    hub = subprocess.Popen([sys.executable, "-m", "agent", "hub", "serve", "--dir", str(hub_dir), "--port", "0",
                            "--bind", "127.0.0.1"], env=_env(user), text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, cwd=ROOT)
    agent: subprocess.Popen[str] | None = None
    try:
        assert hub.stdout is not None
        line = hub.stdout.readline()
        url = line.split("serving at", 1)[1].strip()
        _panal(agent_home, "agent", "join", url)
        prefs = "pause_on_battery: false\n"
        if worker_idle_minutes is not None:
            prefs += f"worker_idle_minutes: {worker_idle_minutes}\n"
        (agent_home / "prefs.yaml").write_text(prefs)
        log = open(tmp / "agent.log", "w")  # noqa: SIM115
        agent = subprocess.Popen([sys.executable, "-m", "agent", "agent", "run", "--slots", "1"],
                                 env=_env(agent_home), text=True, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        started = time.perf_counter()
        _wait("the agent to poll its board", lambda: _polling(agent_home))
        ready_s = round(time.perf_counter() - started, 1)
        time.sleep(5)   # start-up work (capability probe, warm-up) settles
        procs = _tree(agent.pid)
        cpu0, t0 = _cpu_s(procs), time.monotonic()
        time.sleep(idle_s)
        procs = _tree(agent.pid)
        idle_cpu_per_h = round((_cpu_s(procs) - cpu0) / (time.monotonic() - t0) * 3600, 1)
        idle = {"rss_tree_mb": _rss_mb(procs), "rss_daemon_mb": _rss_mb(procs[:1]), "processes": len(procs),
                "cpu_s_per_hour": idle_cpu_per_h}
        manifest = tmp / "sleep.yaml"
        manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: tick}\n"
                            "spec: {task: sleep, params: {seconds: 0}}\n")
        cold = _submit_sleep(user, url, manifest)
        warm = _submit_sleep(user, url, manifest)
        busy_procs = _tree(agent.pid)
        return {"ready_s": ready_s, "idle_s": idle_s, "worker_idle_minutes": worker_idle_minutes, "idle": idle,
                "first_task_cold_s": cold, "next_task_warm_s": warm,
                "after_task": {"rss_tree_mb": _rss_mb(busy_procs), "processes": len(busy_procs)}}
    finally:
        for proc in (agent, hub):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--worker-idle-minutes", default=None, help="minutes, or never (the old always-warm worker)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="panal-idle-") as tmp:
        print(json.dumps(measure(Path(tmp), args.idle_s, args.worker_idle_minutes), indent=2))


if __name__ == "__main__":
    main()
