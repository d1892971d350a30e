"""The resident-memory watch of a task's process tree (agent/engine/memwatch.py), with real processes.

It starts with every task (its baseline), so it must not read every process on the machine: on Linux the
kernel's per-thread lists of children are walked instead of psutil's scan of all of /proc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
from helpers import wait_for

from agent.engine import memwatch
from agent.engine.memwatch import tree_rss

#: a child that starts a grandchild holding 64 MB resident, then waits; both print their pid when ready
_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 * 2**20); print('ready', flush=True); "
                          "import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
child.wait()
"""
HELD = 64 * 2**20


@pytest.fixture
def tree() -> Iterator[tuple[int, int]]:
    """(the parent's pid, the grandchild's pid), the grandchild's 64 MB resident."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    yield parent.pid, grandchild
    for proc in psutil.Process(parent.pid).children(recursive=True):
        proc.kill()
    parent.kill()
    parent.wait()
    parent.stdout.close()


@pytest.mark.skipif(not memwatch._PROC_CHILDREN, reason="needs Linux's /proc/PID/task/TID/children")
def test_a_trees_memory_is_summed_without_scanning_every_process(tree: tuple[int, int],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    parent, grandchild = tree
    def scan(*_: object, **__: object) -> None:
        raise AssertionError("psutil scanned every process for children")
    monkeypatch.setattr(psutil.Process, "children", scan)
    total = wait_for(lambda: (rss := tree_rss(parent)) >= HELD and rss, "the grandchild's memory counted")
    assert total >= psutil.Process(parent).memory_info().rss + psutil.Process(grandchild).memory_info().rss * 0.9


def test_without_the_kernels_lists_the_same_tree_is_summed(tree: tuple[int, int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    parent, _ = tree
    fast = tree_rss(parent) if memwatch._PROC_CHILDREN else None
    monkeypatch.setattr(memwatch, "_PROC_CHILDREN", False)
    scanned = wait_for(lambda: (rss := tree_rss(parent)) >= HELD and rss, "the grandchild's memory counted")
    if fast is not None:   # the two ways see the same processes (their RSS moves a little meanwhile)
        assert abs(fast - scanned) < HELD / 4


def test_a_process_that_is_gone_holds_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_rss(proc.pid) == 0
