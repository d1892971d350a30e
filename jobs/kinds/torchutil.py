"""Small torch helpers shared by kinds: device handles, honest timing, digests. Imported lazily."""

from __future__ import annotations

import ctypes
import hashlib
import time
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def torch_device(name: str) -> Any:
    import torch

    return torch.device(name)


def synchronize(device: Any) -> None:
    """Wait for queued device work, so wall time measures the work and not the launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def usable_dtype(name: str, device: Any, notes: list[str]) -> Any:
    """The dtype to run with: degrade fp16/bf16 to fp32 where the device can't do it well."""
    import torch

    wanted = getattr(torch, name)
    if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        notes.append("bfloat16 unsupported on this GPU: ran in float32")
        return torch.float32
    if device.type == "cuda" and name == "float16":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 6:
            notes.append("float16 is slow on compute capability < 6.0: ran in float32")
            return torch.float32
    return wanted


def tensor_digest(tensor: Any) -> str:
    """SHA-256 of a tensor's bytes (moved to CPU, contiguous, as stored)."""
    data = tensor.detach().to("cpu").contiguous()
    # Read the buffer in place (any dtype, bfloat16 included); iterating the storage is O(n) Python.
    return hashlib.sha256(ctypes.string_at(data.data_ptr(), data.numel() * data.element_size())).hexdigest()


def tensor_summary(tensor: Any) -> dict[str, Any]:
    """What a board compares of an output tensor without reading it (jobs/compare.py): shape, dtype,
    sum and sum of |x| over the finite elements, and a digest of where the NaN/Inf elements are."""
    import torch

    data = tensor.detach().to("cpu")
    as64 = data.double() if data.is_floating_point() else data.to(torch.float64)
    finite = torch.isfinite(as64)
    nonfinite = "" if bool(finite.all()) else hashlib.sha256(
        (~finite).flatten().to(torch.uint8).numpy().tobytes()).hexdigest()
    kept = torch.where(finite, as64, torch.zeros_like(as64))
    return {"shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."),
            "sum": float(kept.sum().item()), "abs_sum": float(kept.abs().sum().item()), "nonfinite": nonfinite}


class Timer:
    """Wall time of a block, synchronised with the device before and after."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
