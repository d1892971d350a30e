"""How much a device can hold, and shrinking work to fit it (with a note) instead of failing.

Old GPUs are first class: a batch that would not fit is made smaller and the result says so.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fit_count", "free_bytes"]

#: share of the free memory a task plans to use; the rest is headroom for allocator slack.
HEADROOM = 0.7


def free_bytes(device: Any) -> int | None:
    """Free memory on ``device`` in bytes (None where it cannot be told, e.g. MPS)."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def fit_count(wanted: int, bytes_each: float, device: Any, notes: list[str], what: str,
              free: int | None = None) -> int:
    """``wanted`` items of ``bytes_each``, or fewer (at least 1) if they would not fit the device."""
    free = free_bytes(device) if free is None else free
    if free is None or bytes_each <= 0 or wanted * bytes_each <= HEADROOM * free:
        return wanted
    fitted = max(1, int(HEADROOM * free // bytes_each))
    if fitted < wanted:
        notes.append(f"{what} {wanted} does not fit in {free / 2**30:.1f} GiB free on {device}: "
                     f"ran with {fitted}")
        return fitted
    return wanted
