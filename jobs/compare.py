"""Do two results of the same unit agree? Comparators per kind and dtype, without torch or numpy.

A board compares the ``values`` of instances of one unit (hub/trust/). Deterministic kinds
(``sleep``, integer outputs) compare exactly. Floating-point kinds compare tolerantly, because the
same computation on another CPU/GPU, BLAS or thread count differs in the last bits: shapes, dtypes,
integers and strings must be equal, NaN/Inf positions must be equal, and numbers must satisfy
``max|a-b| / mean|ref| <= bound`` with a per-dtype bound (fp32 1e-4 with TF32 off, 5e-3 where TF32
may be on, fp16 5e-3, bf16 3e-2, from the mixed-precision literature).

Why summaries instead of parsing output tensors on the board: the hub carries neither torch nor
numpy and must not read gigabytes of outputs per result; a kind reports, under the agent's
signature, a summary of each output tensor (``shape``, ``dtype``, ``sum``, ``abs_sum`` and a digest
of the NaN/Inf positions). ``|sum_a - sum_b| <= bound * abs_sum`` follows from the element-wise
bound (|Σa-Σb| <= Σ|a-b| <= n·max|a-b|, abs_sum = n·mean|ref|), so honest results never fail it;
it is weaker at catching lies than an element-wise check (a liar must still produce sums within
the bound, which in practice means doing the work).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODES", "TOLERANCES", "CompareSpec", "disagreement"]

MODES = ("exact", "tolerant", "none")

#: the bound on max|a-b| / mean|ref| per dtype; "tf32" applies to float32 computed on a CUDA device
TOLERANCES: dict[str, float] = {"float64": 1e-10, "float32": 1e-4, "tf32": 5e-3, "float16": 5e-3,
                                "bfloat16": 3e-2}


@dataclass(frozen=True)
class CompareSpec:
    """How a kind's results are compared (a manifest's ``policy.validation.compare`` may override)."""

    mode: str = "exact"
    ignore: tuple[str, ...] = ()        # top-level values never compared (digests of bits, timings)
    #: top-level value -> the value that is its scale: |a-b| <= bound * max(|scale_a|, |scale_b|)
    scaled: Mapping[str, str] = field(default_factory=dict)
    tolerance: float | None = None      # the bound, overriding the dtype's
    #: float32 results may come from TF32 on a CUDA device (cuDNN convolutions: on by default in torch);
    #: False for kinds whose float32 math never uses it (torch matmul keeps TF32 off by default), so an
    #: agent's own claim to have run on a GPU cannot loosen their bound
    tf32: bool = False

    def bound(self, values: Mapping[str, Any], on_gpu: bool) -> float:
        if self.tolerance is not None:
            return self.tolerance
        dtype = str(values.get("dtype", "float32"))
        if dtype == "float32" and on_gpu and self.tf32:
            dtype = "tf32"
        return TOLERANCES.get(dtype, TOLERANCES["float32"])

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "ignore": list(self.ignore), "scaled": dict(self.scaled), "tf32": self.tf32,
                "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompareSpec:
        tolerance = data.get("tolerance")
        return cls(str(data.get("mode", "exact")), tuple(data.get("ignore", ())), dict(data.get("scaled", {})),
                   float(tolerance) if tolerance is not None else None, bool(data.get("tf32", False)))


def disagreement(spec: CompareSpec, ref: Mapping[str, Any], other: Mapping[str, Any],
                 on_gpu: bool = False) -> str | None:
    """Why ``other`` does not agree with ``ref`` (None: they agree)."""
    if spec.mode == "none":
        return None
    a = {k: v for k, v in ref.items() if k not in spec.ignore}
    b = {k: v for k, v in other.items() if k not in spec.ignore}
    if spec.mode == "exact":
        if _canonical(a) != _canonical(b):
            return "values differ (exact comparison)"
        return None
    bound = spec.bound(ref, on_gpu)
    if set(a) != set(b):
        return f"different values: {sorted(set(a) ^ set(b))}"
    for key in sorted(a):
        scale = spec.scaled.get(key)
        if scale is not None and _is_number(a[key]) and _is_number(b[key]):
            why = _scaled(float(a[key]), float(b[key]), _abs(ref.get(scale)), _abs(other.get(scale)), bound)
        else:
            why = _tolerant(a[key], b[key], bound)
        if why:
            return f"{key}: {why}"
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _abs(value: Any) -> float:
    return abs(float(value)) if _is_number(value) else 0.0


def _scaled(a: float, b: float, scale_a: float, scale_b: float, bound: float) -> str | None:
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return None if _canonical(a) == _canonical(b) else "non-finite mismatch"
    # the smaller positive scale: an answer cannot widen its own tolerance by claiming a large scale
    scale = min([s for s in (scale_a, scale_b) if s > 0] or [max(abs(a), abs(b))])
    if abs(a - b) > bound * scale + 1e-300:   # (no values in the reason: it goes back to the outvoted agent)
        return f"off by {abs(a - b) / (scale or 1.0):.3g} of the scale (bound {bound:g})"
    return None


def _tolerant(a: Any, b: Any, bound: float) -> str | None:
    """Structure and exact leaves must match; numbers and number lists compare within ``bound``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"different fields: {sorted(set(a) ^ set(b))}"
        if {"sum", "abs_sum"} <= set(a):   # a tensor summary (jobs/kinds/torchutil.tensor_summary)
            for key in sorted(a):
                why = (_scaled(float(a["sum"]), float(b["sum"]), _abs(a["abs_sum"]), _abs(b["abs_sum"]), bound)
                       if key == "sum" and _is_number(a[key]) and _is_number(b[key]) else
                       _tolerant(a[key], b[key], bound))
                if why:
                    return f"{key}: {why}"
            return None
        for key in sorted(a):
            why = _tolerant(a[key], b[key], bound)
            if why:
                return f"{key}: {why}"
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"length {len(a)} vs {len(b)}"
        if a and all(_is_number(x) for x in a) and all(_is_number(x) for x in b):
            return _tensor(a, b, bound)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            why = _tolerant(x, y, bound)
            if why:
                return f"[{i}]: {why}"
        return None
    if (isinstance(a, float) and _is_number(b)) or (isinstance(b, float) and _is_number(a)):
        return _tensor([a], [b], bound)
    return None if _canonical(a) == _canonical(b) else "values differ"


def _tensor(a: list[Any], b: list[Any], bound: float) -> str | None:
    """max|a-b| / mean|a| over the finite elements; NaN and Inf must sit at the same positions."""
    worst, total, n = 0.0, 0.0, 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            if _canonical(x) != _canonical(y):
                return f"non-finite mismatch at [{i}]"
            continue
        worst = max(worst, abs(x - y))
        total += abs(x)
        n += 1
    mean = total / n if n else 0.0
    if worst > bound * (mean if mean > 0 else 1.0):
        return f"max|a-b| is {worst / (mean if mean > 0 else 1.0):.3g} x mean|ref|, over the bound {bound:g}"
    return None

