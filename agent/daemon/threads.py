"""How many CPU threads a task gets: what its manifest asks (``spec.resources.threads``), within what
the volunteer lends (``--threads``, the ``cpu_threads`` preference, else cores / slots).

Measured with ``benchmarks/bench_threads.py`` on a busy 2-core machine (small ``mlp_train``):
with OpenMP's default *active* wait policy, 2 threads ran ~100x slower than 1 (911 vs 97,667
samples/s), because a waiting thread spins on a core another process needs; with
``OMP_WAIT_POLICY=PASSIVE`` (set by the worker, :mod:`agent.engine.worker`) 2 threads ran as fast as
1 or faster. So the default stays "every thread the volunteer lends a slot", and a task whose model
is too small to use them can ask for fewer.
"""

from __future__ import annotations

__all__ = ["lent_threads", "task_threads"]


def lent_threads(flag: int, preference: int | None, cores: int, slots: int) -> int:
    """The most threads one task may use: ``--threads``, else the ``cpu_threads`` preference, else
    this machine's cores shared among the slots (at least 1)."""
    return max(1, flag or preference or (cores // max(1, slots)))


def task_threads(requested: int | None, lent: int) -> int:
    """A task's threads: what it asks for, within what is lent (all of it when it asks nothing)."""
    return lent if requested is None else max(1, min(requested, lent))
