"""What the run loop watches in a sandbox besides the memory cap: its files, its tmpfs, its crowd.

A sandboxed task writes only under its private ``root/work`` (the host's disk) and its private
``/tmp`` and ``/dev/shm`` (tmpfs: the host's memory). Inside, ``RLIMIT_FSIZE`` stops any one file at
the disk cap at once (the write fails with ``EFBIG``, classified by :mod:`agent.engine.violations`);
this watch stops many files together: every ``DISK_EVERY`` memory checks it sums the work dir's
sizes (``lstat``, never following a link; at most ``MAX_FILES`` entries, more is itself a violation:
inodes are the volunteer's too) and ends the task past the cap. The tmpfs pages are memory that
no process's resident set shows until mapped, so they count toward the memory cap here, read
with ``statvfs`` through ``/proc/PID/root`` of a process in the sandbox (O(1), no walk).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import psutil

from agent.engine.memwatch import MemoryWatch, tree_rss

__all__ = ["DISK_EVERY", "MAX_FILES", "SandboxWatch", "remove_tree"]

#: the disk walk runs on every this-many-th memory check (one per second at WATCH_S = 0.25)
DISK_EVERY = 4
#: files and directories the work dir may hold; a walk stops here
MAX_FILES = 20_000
#: the longest path (bytes) under the work dir the walk accounts for: deeper ones (made relative to a
#: deep cwd inside) could not be listed from the host, so their files would go uncounted
MAX_PATH = 3072
#: processes at once that make a memory overrun a fork bomb (a DataLoader's workers are a handful)
CROWD = 32


def dir_usage(root: Path, max_entries: int = MAX_FILES) -> tuple[int, int, bool]:
    """(bytes allocated, entries, whether a path went past ``MAX_PATH``) under ``root``, links not
    followed; stops past ``max_entries`` or at the first path too deep."""
    total, entries = 0, 0
    stack = [str(root)]
    while stack and entries <= max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        total += max(st.st_blocks * 512, st.st_size if stat.S_ISREG(st.st_mode) else 0)
                        if stat.S_ISDIR(st.st_mode):
                            if len(os.fsencode(entry.path)) > MAX_PATH:
                                return total, entries, True
                            stack.append(entry.path)
        except OSError:
            continue
    return total, entries, False


def tmpfs_usage(pid: int) -> int:
    """Bytes held in the sandbox's ``/tmp`` and ``/dev/shm`` (tmpfs: memory), seen from the host."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return 0
    total = 0
    for child in children[:1]:   # bubblewrap's init: it and all below share the sandbox's mounts
        for mount in ("tmp", "dev/shm"):
            with contextlib.suppress(OSError):
                vfs = os.statvfs(f"/proc/{child.pid}/root/{mount}")
                total += (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
    return total


class SandboxWatch(MemoryWatch):
    """The memory watch (resident sets plus the sandbox's tmpfs), its files' disk cap, and a note
    of a crowd of processes (a fork bomb's shared pages look like a huge resident set)."""

    def __init__(self, pid: int, cap_gb: float | None, work: Path, disk_bytes: int) -> None:
        self.work, self.disk_bytes = work, disk_bytes
        self.crowded = 0
        self.disk_violation: str | None = None
        self._ticks = 0
        super().__init__(pid, cap_gb or 0.0)
        if not cap_gb:
            self.limit = 2**63   # no memory cap asked: only the disk is watched

    def over(self) -> str | None:
        self._ticks += 1
        if self._ticks % DISK_EVERY == 0:
            used, entries, deep = dir_usage(self.work)
            if deep:
                self.disk_violation = (f"disk limit: the task made paths over {MAX_PATH} bytes long in its work "
                                       f"dir (too deep to account for); task killed")
            elif entries > MAX_FILES:
                self.disk_violation = (f"disk limit: the task made more than {MAX_FILES} files and directories "
                                       f"in its work dir; task killed")
            elif used > self.disk_bytes:
                self.disk_violation = (f"disk limit: the task's files took {used / 2**20:.0f} MiB, over the "
                                       f"sandbox's {self.disk_bytes / 2**20:.0f} MiB; task killed")
            if self.disk_violation:
                return self.disk_violation
        rss = tree_rss(self.pid)
        shm = tmpfs_usage(self.pid) if self.limit < 2**63 else 0
        self.peak = max(self.peak, rss + shm)
        if rss + shm <= self.limit:
            return None
        with contextlib.suppress(psutil.Error):
            count = 1 + len(psutil.Process(self.pid).children(recursive=True))
            if count >= CROWD:
                self.crowded = count
        return (f"memory cap of {self.cap_gb:g} GB exceeded: the task's processes held {rss / 2**30:.2f} GB "
                f"resident and {shm / 2**30:.2f} GB in its /tmp and /dev/shm ({self.baseline / 2**30:.2f} GB "
                f"before it began); task killed")


def remove_tree(path: Path | str) -> None:
    """Remove a directory tree a sandboxed task wrote, however deep: ``shutil.rmtree`` recurses per
    level (a tree thousands of levels deep, made in a second relative to a deep cwd, raises
    RecursionError and stays on the disk), so what it leaves goes to ``rm -rf``, which does not."""
    with contextlib.suppress(RecursionError):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, timeout=600,
                           check=False)
