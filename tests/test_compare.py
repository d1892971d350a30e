"""Comparators of results of one unit (jobs/compare.py): exact, tolerant per dtype, summaries, none."""

from __future__ import annotations

import math

from jobs.catalog import get_kind
from jobs.compare import CompareSpec, disagreement

MATMUL = get_kind("matmul").compare


def test_exact_kinds_agree_only_on_equal_values() -> None:
    spec = get_kind("sleep").compare
    assert disagreement(spec, {"slept": 1.0}, {"slept": 1.0}) is None
    assert disagreement(spec, {"slept": 1.0}, {"slept": 1.0000001}) is not None


def test_fp32_checksums_agree_within_the_bound_of_the_sum_of_magnitudes() -> None:
    ref = {"checksum": 12.5, "abs_sum": 1e6, "digest": "a" * 64, "dtype": "float32"}
    close = {**ref, "checksum": 12.5 + 50.0, "digest": "b" * 64}      # 5e-5 of the scale: last-bit noise
    far = {**ref, "checksum": 12.5 + 500.0}                            # 5e-4: over fp32's 1e-4
    assert disagreement(MATMUL, ref, close) is None
    assert disagreement(MATMUL, ref, far) is not None
    # torch matmul keeps TF32 off: an agent's claim to have run on a GPU does not loosen the bound
    assert disagreement(MATMUL, ref, far, on_gpu=True) is not None
    conv = CompareSpec("tolerant", ignore=("digest",), scaled={"checksum": "abs_sum"}, tf32=True)
    assert disagreement(conv, ref, far, on_gpu=True) is None           # cuDNN convolutions may use TF32: 5e-3


def test_an_answer_cannot_widen_its_tolerance_with_a_large_scale_nor_learn_the_reference() -> None:
    ref = {"checksum": 12.5, "abs_sum": 1e6, "digest": "a" * 64, "dtype": "float32"}
    liar = {**ref, "checksum": 0.0, "abs_sum": 1e9}   # a checksum it never computed, a scale it made up
    why = disagreement(MATMUL, ref, liar)
    assert why is not None and "12.5" not in why and "1e+06" not in why, why


def test_the_bound_follows_the_dtype() -> None:
    ref = {"checksum": 0.0, "abs_sum": 100.0}
    for dtype, ok, bad in (("float16", 0.4, 0.6), ("bfloat16", 2.9, 3.1)):
        assert disagreement(MATMUL, {**ref, "dtype": dtype}, {**ref, "dtype": dtype, "checksum": ok}) is None
        assert disagreement(MATMUL, {**ref, "dtype": dtype}, {**ref, "dtype": dtype, "checksum": bad}) is not None


def test_tolerant_lists_need_equal_shape_and_nan_positions() -> None:
    spec = CompareSpec("tolerant", tolerance=1e-3)
    curve = [1.0, 0.5, 0.25]
    assert disagreement(spec, {"c": curve}, {"c": [1.0, 0.5002, 0.25]}) is None
    assert disagreement(spec, {"c": curve}, {"c": [1.0, 0.51, 0.25]}) is not None
    assert disagreement(spec, {"c": curve}, {"c": curve[:2]}) is not None
    assert disagreement(spec, {"c": [1.0, math.nan]}, {"c": [1.0, math.nan]}) is None
    assert disagreement(spec, {"c": [1.0, math.nan]}, {"c": [math.nan, 1.0]}) is not None
    assert disagreement(spec, {"n": 3, "s": "x"}, {"n": 4, "s": "x"}) is not None   # integers stay exact


def test_tensor_summaries_compare_shape_dtype_nonfinite_and_sums() -> None:
    spec = get_kind("inference").compare
    y = {"shape": [4, 2], "dtype": "float32", "sum": 10.0, "abs_sum": 1000.0, "nonfinite": ""}
    ok = {"summaries": {"y": {**y, "sum": 10.05}}}
    assert disagreement(spec, {"summaries": {"y": y}}, ok) is None
    for bad in ({**y, "shape": [2, 4]}, {**y, "dtype": "float16"}, {**y, "nonfinite": "ab"}, {**y, "sum": 11.0}):
        assert disagreement(spec, {"summaries": {"y": y}}, {"summaries": {"y": bad}}) is not None


def test_measurement_kinds_are_not_compared() -> None:
    assert disagreement(get_kind("benchmark").compare, {"results": [1]}, {"results": [2]}) is None
