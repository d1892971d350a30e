"""A private PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` from the system's ``postgresql`` package.

Each test session (each pytest-xdist worker) starts one cluster in a temporary directory on a free
loopback port and stops it at the end; tests get a fresh database each (:meth:`PgServer.database`),
so they never see each other's rows and run in parallel. ``initdb`` refuses to run as root, so as root
the server runs as a system user (``postgres`` where the package made one, else ``nobody``) through
``runuser``; a developer's own account runs it directly. Trust authentication on 127.0.0.1 only:
the cluster is reachable from this machine alone and lives as long as the session.

Used by the ``pg`` fixture (tests/conftest.py); a test that needs its own server (to stop it, say)
makes a :class:`PgServer` itself.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

__all__ = ["PgServer", "PgUnavailable", "find_bindir"]

SUPERUSER = "panal"


class PgUnavailable(Exception):
    """The server cannot be started here; the message says why (a test skips, or fails under CI)."""


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: ``pg_config --bindir``, PATH, or Debian's versioned dirs."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).resolve().parent)
    # Debian puts the server binaries in /usr/lib/postgresql/VERSION/bin, off PATH: the newest first
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                         key=lambda p: _version(p.parent.name), reverse=True)
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file() and (path / "postgres").is_file():
            return path
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster of its own: :meth:`start`, :meth:`database` per test, :meth:`stop`."""

    def __init__(self, *, fsync: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PgUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
        self.bindir = bindir
        self.fsync = fsync          # off for tests (no machine crash to survive); on for benchmarks
        self.port = 0
        self.version = 0            # server_version_num, once asked
        self.user = self._run_as()
        self.root = Path(tempfile.mkdtemp(prefix="panal-pg-"))   # in /tmp: reachable by the server's account
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    @staticmethod
    def _run_as() -> str | None:
        """None: run as ourselves; else the account root must hand the server to."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            if shutil.which("runuser"):
                return name
        raise PgUnavailable("running as root without a 'postgres' or 'nobody' account and runuser: "
                            "initdb refuses to run as root")

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _check(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise PgUnavailable(f"{Path(args[0]).name} failed ({proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()[-1500:]} {tail}")

    def start(self) -> PgServer:
        if self.user:   # the server's account must own its directory (and reach it: mkdtemp makes it 0700)
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._check(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                    "-E", "UTF8", "--locale=C", "--no-sync")
        for _ in range(3):   # another process may take the free port between the probe and the bind
            self.port = _free_port()
            try:
                self.restart()
                return self
            except PgUnavailable:
                if "could not bind" not in (self.log.read_text() if self.log.exists() else ""):
                    raise
        raise PgUnavailable(f"could not bind a free port: {self.log.read_text()[-1000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would) and keep its files for :meth:`restart`."""
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
                       capture_output=True, timeout=60, check=False)

    def restart(self) -> None:
        """Start the stopped server again on the same port (its data is back)."""
        settings = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                    f"-c fsync={'on' if self.fsync else 'off'} -c shared_buffers=32MB -c max_connections=200")
        self._check(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                    "-o", settings, "start")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql (synchronously: usable from any fixture); its output."""
        proc = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-d", self.url(database), "-c", statement],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"psql {statement!r}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def database(self) -> str:
        """A new, empty database; its name (drop it with :meth:`drop`)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        if not self.version:
            self.version = int(self.sql("SHOW server_version_num"))
        # file_copy (PostgreSQL 15+) copies the tiny template's files instead of logging them all to WAL
        strategy = " STRATEGY file_copy" if self.version >= 150000 else ""
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0{strategy}")
        return name

    def drop(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
