"""``panal demo`` / ``make demo``: the whole WAN loop on one machine, as separate processes.

A hub (TLS, self-signed, pinned), two agents with their own identities, a submitter: the same
commands a user runs by hand, so the demo doubles as a living tutorial.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from hub.home import HubHome

__all__ = ["panal_cli", "run_demo", "start_hub", "stop"]

DEMO_DIR = Path(".demo")
MANIFEST = Path("configs/examples/matmul.yaml")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PANAL_HOME": str(home.resolve()), "PYTHONUNBUFFERED": "1"}


def panal_cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "agent", *args], env=_env(home), text=True,
                          capture_output=True, timeout=600)
    if check and proc.returncode != 0:
        raise click.ClickException(f"`panal {' '.join(args)}` failed:\n{proc.stderr.strip()}")
    return proc


def _step(text: str) -> None:
    click.secho(f"==> {text}", fg="cyan", bold=True)


def start_hub(root: Path, user_home: Path, host: str = "127.0.0.1",
              settings: dict[str, Any] | None = None) -> tuple[subprocess.Popen[str], str]:
    """`panal hub init` + `panal hub serve` on a free port; returns the process and its join URL.

    On 127.0.0.1 the hub is a local-only board (open registration, no per-address connection cap); any
    other address, even another loopback one such as 127.0.0.2, gets the WAN defaults (token registration,
    per-address caps): what a bench of a hub on the internet must measure. ``settings`` go into hub.yaml."""
    panal_cli("hub", "init", "--dir", str(root), "--host", host, home=user_home)
    if settings:
        HubHome(root).configure(**settings)
        if settings.get("store"):   # init authorised the user in the default store: again in this one
            panal_cli("hub", "init", "--dir", str(root), home=user_home)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "hub", "serve", "--dir", str(root), "--port", "0",
                             "--bind", host],
                            env=_env(user_home), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving at" not in line:
        proc.kill()
        raise click.ClickException(f"hub did not start: {line!r}")
    return proc, line.split("serving at", 1)[1].split(" (")[0].strip()   # (" (a standby until ...)": a HA hub)


def start_agent(home: Path, url: str, name: str) -> subprocess.Popen[str]:
    panal_cli("agent", "join", url, "--name", name, home=home)
    return subprocess.Popen([sys.executable, "-m", "agent", "agent", "run", "--name", name, "--no-lan"],
                            env=_env(home), stdout=subprocess.DEVNULL, text=True)


def stop(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM in reverse start order (agents drain into the hub before the hub goes)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(keep: bool = False, manifest: Path = MANIFEST) -> int:
    if not manifest.exists():
        raise click.ClickException(f"{manifest} not found: run the demo from the repository root")
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    user = DEMO_DIR / "user"
    procs: list[subprocess.Popen[str]] = []
    try:
        _step("panal hub init + panal hub serve (TLS, self-signed certificate, SQLite)")
        hub, url = start_hub(DEMO_DIR / "hub", user)
        procs.append(hub)
        click.echo(f"hub join URL: {url}")
        _step("panal agent join + panal agent run, twice (two volunteers, two identities)")
        for name in ("volunteer-1", "volunteer-2"):
            procs.append(start_agent(DEMO_DIR / name, url, name))
        _step(f"panal submit {manifest} --wait")
        started = time.monotonic()
        sub = panal_cli("submit", str(manifest), "--hub", url, "--wait", "--json", home=user, check=False)
        if sub.returncode != 0:
            click.echo(sub.stderr, err=True)
            return sub.returncode
        jobs = json.loads(sub.stdout)
        click.echo(f"{len(jobs)} job(s) finished in {time.monotonic() - started:.1f} s")
        for job in jobs:
            _step(f"panal results {job['id']} --verify")
            res = panal_cli("results", job["id"], "--hub", url, "--verify", home=user, check=False)
            click.echo(res.stdout.rstrip())
            click.echo(res.stderr.rstrip())
            if res.returncode != 0:
                return res.returncode
        _step("done")
        click.echo(f"hub URL: {url}  (live status page: {url.split('#')[0]}, self-signed certificate)")
        return 0
    finally:
        stop(procs)
        if not keep:
            shutil.rmtree(DEMO_DIR, ignore_errors=True)
