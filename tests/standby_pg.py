"""A private PostgreSQL server for the standby tests: ``initdb`` + ``pg_ctl`` on a free port in a temp dir.

It can be stopped and started again on the same port and data (a partition of every hub from the
database, as the hubs see it). Run as root, the server runs as the ``postgres`` user (initdb refuses
root). Missing binaries skip the test with a reason (fail under CI), as tests/system_needs.py does.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.system_needs import require_system

__all__ = ["PrivatePostgres"]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A throwaway server; ``dsn`` works once :meth:`start` returned."""

    def __init__(self) -> None:
        bins = _bin_dir()
        require_system(None if bins else "PostgreSQL server binaries (initdb, pg_ctl: apt install postgresql)")
        assert bins is not None
        # its own directory under /tmp: pytest's tmp_path is private to root, and the server may run as postgres
        root = Path(tempfile.mkdtemp(prefix="panal-pg-"))
        self.bins, self.root, self.port = bins, root, _free_port()
        self.data = root / "pgdata"
        self.dsn = f"postgresql://panal@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        self._run(str(self.bins / "initdb"), "-D", str(self.data), "-U", "panal", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        return self

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.root / "pg.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        subprocess.run([*self._as, str(self.bins / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
