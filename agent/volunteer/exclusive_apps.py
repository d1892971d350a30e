"""Exclusive apps (BOINC's name): programs that pause all work while they run.

A volunteer lists the programs (a game, a video editor) by name; while one of them runs, the agent
stands aside entirely, whatever the load. Matched against ``/proc``, case insensitively: the
kernel's name of each process (``comm``: ``Blender`` matches ``blender``), and, where the kernel cut
that name to 15 characters, the file name of its command (``argv[0]``), so a long name matches too.
The command line is read only then: the scan runs every second and must stay cheap. Only Linux's
``/proc`` is read; where it is missing nothing matches.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

__all__ = ["running_exclusive"]

_COMM_LEN = 15   # TASK_COMM_LEN - 1: the kernel keeps this much of a program's name


def running_exclusive(names: Collection[str], *, proc: Path = Path("/proc"),
                      exclude: Collection[int] = ()) -> str | None:
    """The first of ``names`` that is running now (as listed), or None. ``exclude``: pids not to look
    at (the agent's own)."""
    if not names:
        return None
    wanted = {n.lower(): n for n in names}
    short = {n[:_COMM_LEN]: n for n in wanted}
    try:
        entries = os.listdir(proc)
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        base = proc / entry
        try:
            comm = (base / "comm").read_text(encoding="utf-8", errors="replace").strip().lower()
            if comm in wanted:
                return wanted[comm]
            if len(comm) < _COMM_LEN or comm not in short:
                continue   # not cut short, and not one of ours: no need to read its command line
            argv0 = (base / "cmdline").read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace")
        except OSError:   # gone meanwhile, or not ours to read
            continue
        program = os.path.basename(argv0).lower()
        if program in wanted:
            return wanted[program]
    return None
