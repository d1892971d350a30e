"""Shared fixtures: real hubs (in-process over TLS, or as `panal` subprocesses) and CLI runners."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pgserver import PgServer, PgUnavailable
from system_needs import pytest_terminal_summary, require_system  # noqa: F401  (hook: the closing line on skipped system parts)

from agent.engine.sandbox_pool import SandboxPool
from hub.config import HubConfig
from hub.home import HubHome
from hub.server import BoardServer
from security.identity import Identity
from security.tls import BoardAddress, server_context

ROOT = Path(__file__).resolve().parents[1]


def panal_env(home: Path, **extra: str) -> dict[str, str]:
    # LAN mode is on by default for `panal agent run`; tests outside the netns lab keep it off so
    # they do not announce on this machine's real interfaces.
    return {**os.environ, "PANAL_HOME": str(home), "PYTHONUNBUFFERED": "1", "PANAL_LAN_ENABLED": "false", **extra}


def panal(*args: str, home: Path, timeout: float = 120, check: bool = True,
          **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "agent", *args], env=panal_env(home, **env), text=True,
                          capture_output=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"panal {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Procs:
    """Subprocesses started by a test; all are stopped (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, logs: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.hubs: list[subprocess.Popen[str]] = []   # `panal hub serve` processes, stopped last
        self.logs = logs

    def start(self, *args: str, home: Path, **env: str) -> subprocess.Popen[str]:
        """Start `panal ARGS`; stdout is a pipe (for the first line), stderr goes to a log file
        (a pipe nobody reads would block a chatty process)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{len(self.procs)}-{args[0]}-{home.name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "agent", "-v", *args], env=panal_env(home, **env),
                                text=True, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        log.close()
        self.procs.append(proc)
        if args[0] == "hub":
            self.hubs.append(proc)
        return proc

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        """Agents first, then hubs: a stopping agent releases its tasks and delivers its results to a
        hub that still answers, instead of retrying against a dead one until it is killed."""
        for group in ([p for p in self.procs if p not in self.hubs], self.hubs):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(p.logs_text())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def start_hub_proc(procs: Procs, tmp: Path, user_home: Path, *, bind: str = "127.0.0.1",
                   **env: str) -> tuple[subprocess.Popen[str], str]:
    """`panal hub serve` on a free port; bound to loopback (registration open there) unless ``bind`` says."""
    panal("hub", "init", "--dir", str(tmp / "hub"), home=user_home)
    proc = procs.start("hub", "serve", "--dir", str(tmp / "hub"), "--port", "0", "--bind", bind, home=user_home,
                       **env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving at" in line, (line, procs.logs_text())
    return proc, line.split("serving at", 1)[1].strip()


class InProcessHub:
    """A BoardServer over real TLS on 127.0.0.1:0, in the test's event loop."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.home = HubHome(tmp / "hub")
        self.settings = {"bind": "127.0.0.1", "port": 0, "expiry_interval_s": 0.05, **settings}
        self.server: BoardServer | None = None
        self.address: BoardAddress | None = None

    async def start(self) -> BoardServer:
        config = self.home.init("127.0.0.1", 0)
        config = self.home.config(**self.settings)
        self.server = BoardServer(config, self.home.db_path, server_context(self.home.cert_path,
                                                                             self.home.tls_key_path))
        port = await self.server.start()
        self.address = self.home.address(config, port)
        return self.server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(drain=False)
            self.server = None


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[InProcessHub]:
    h = InProcessHub(tmp_path)
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
async def busy(daemon: Any, hub: InProcessHub, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The test module's ``daemon`` (a real ``agent.daemon.Daemon``) running a real hour-long ``sleep`` task,
    in its warm worker, that it leased from a real board."""
    from helpers import wait_for_async

    from agent.client.board import BoardClient
    from agent.client.submitting import make_envelope, submit
    from jobs.manifest import Manifest

    monkeypatch.setenv("PANAL_WORKER_PRELOAD", "0")  # a sleep worker needs no torch
    assert hub.server is not None and hub.address is not None
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "user")
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "long"},
                                   "spec": {"task": "sleep", "params": {"seconds": 3600}}})
    async with BoardClient(hub.address, user) as client:
        await submit(client, make_envelope(user, manifest))
    daemon.add_board(hub.address)
    try:
        await wait_for_async(lambda: [t for t in daemon.status()["tasks"] if t["progress"] > 0],
                             "the daemon to lease the task and run it")
        yield daemon
    finally:
        await daemon.shutdown()


def require_sandbox() -> None:
    """Skip (outside CI) where bubblewrap cannot start a sandbox here, saying why and how to fix it."""
    from agent.engine.sandbox import probe

    status = probe()
    require_system(None if status.available else f"sandbox ({status.reason}): {status.fix}")


@pytest.fixture
def sandbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A working sandbox, whose worker knows the test-only kinds and skips torch's import (a fast start)."""
    require_sandbox()
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")
    monkeypatch.setenv("PANAL_WORKER_PRELOAD", "0")


@pytest.fixture
def user() -> Identity:
    return Identity.generate()


__all__ = ["ROOT", "HubConfig", "InProcessHub", "Procs", "panal", "start_hub_proc"]


# -- PostgreSQL (tests/pgserver.py) ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer | str]:
    """One private PostgreSQL cluster per test session (per xdist worker), or why none could start."""
    try:
        server = PgServer()
    except PgUnavailable as exc:
        yield str(exc)
        return
    try:
        server.start()
    except PgUnavailable as exc:
        server.destroy()
        yield str(exc)
        return
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg(pg_server: PgServer | str) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database of this test's own (dropped afterwards)."""
    if isinstance(pg_server, str):
        require_system(f"PostgreSQL server: {pg_server}")
        raise AssertionError("unreachable")
    name = pg_server.database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop(name)


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of this test's own, which it may stop and start again (a partition, a crash)."""
    try:
        server = PgServer().start()
    except PgUnavailable as exc:
        require_system(f"PostgreSQL server: {exc}")
        raise
    yield server
    server.destroy()


# -- the sandbox's tests (tests/test_sandbox.py, tests/test_sandbox_escape.py) --------------------------------
#: what the agent home's files hold: submitter code must never see it
SANDBOX_SECRET = "not-for-submitters-0123456789"


@pytest.fixture
async def pool(agent_home: Path) -> AsyncIterator[SandboxPool]:
    """The sandboxes of an agent whose home is the test module's ``agent_home`` (kept out of every sandbox)."""
    sandboxes = SandboxPool(agent_home / "work", exclude=[agent_home])
    yield sandboxes
    await sandboxes.close()


# -- the status page's browser (tests/status_browser.py) --------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """The system's Chromium, headless, through Playwright (imported here only when a test asks for it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require_system(None if chromium else "Chromium (Debian package chromium) for the status page tests")
    assert chromium is not None
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        await b.close()
