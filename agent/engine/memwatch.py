"""The second memory fence around a task: the worker's resident memory, watched from the daemon.

The first fence is ``RLIMIT_DATA`` set inside the worker (``agent/engine/worker.py``): an allocation
past the task's cap fails at once with a clean ``oom``. It counts *private writable* mappings only,
which is why it and not ``RLIMIT_AS`` is used: torch reserves large address ranges it never touches
(CUDA maps tens of GB of ``PROT_NONE`` address space at init), so an address-space cap would refuse
CUDA itself, while ``RLIMIT_DATA`` ignores those reservations. What ``RLIMIT_DATA`` misses: shared
anonymous memory (``mmap(-1, n)``, ``/dev/shm`` tensors), and child processes (a DataLoader's
workers each get their own limit). This watch covers both: it sums the resident set of the worker
and its descendants every ``WATCH_S`` and the runner kills the task once it passes the cap (plus
what the warm worker held before the task began, plus a slack for allocator noise).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

__all__ = ["WATCH_S", "MemoryWatch", "tree_rss"]

#: how often the daemon looks (a task may overshoot by what it allocates in this time)
WATCH_S = 0.25
#: the allowance over the cap before the watch acts (allocator caches, page tables, fragmentation)
SLACK = 1.10


#: Linux with CONFIG_PROC_CHILDREN (the common kernels): each thread's children are listed by the kernel, so a
#: process tree is walked without reading every process on the machine, as psutil's ``children()`` must (about
#: 1 ms on a desktop's few hundred processes, on the path of every task: the watch starts with the task)
_PROC_CHILDREN = Path(f"/proc/self/task/{os.getpid()}/children").exists()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the kernel's per-thread lists of children (a process that exits
    meanwhile is left out)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                todo += map(int, Path(f"/proc/{current}/task/{tid}/children").read_text().split())
            except OSError:
                continue
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and every descendant (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *_descendants(root)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    if not _PROC_CHILDREN:
        return root.children(recursive=True)
    found = []
    for pid in _tree(root.pid)[1:]:
        with contextlib.suppress(psutil.Error):   # exited since it was listed
            found.append(psutil.Process(pid))
    return found


class MemoryWatch:
    """One task's watch: the worker tree's RSS at the start, and the limit over it."""

    def __init__(self, pid: int, cap_gb: float) -> None:
        self.pid, self.cap_gb = pid, cap_gb
        self.baseline = tree_rss(pid)
        self.limit = self.baseline + int(cap_gb * 2**30 * SLACK)
        self.peak = self.baseline

    def over(self) -> str | None:
        """Why the task must stop (its tree's RSS is past the limit), or None."""
        rss = tree_rss(self.pid)
        self.peak = max(self.peak, rss)
        if rss <= self.limit:
            return None
        return (f"memory cap of {self.cap_gb:g} GB exceeded: the task's processes held {rss / 2**30:.2f} GB "
                f"resident ({self.baseline / 2**30:.2f} GB before it began); task killed")
