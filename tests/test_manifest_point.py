"""``Manifest.point``: one unit's parameters, equal to the expanded list's, without expanding it."""

from __future__ import annotations

import pytest

from jobs.manifest import Manifest


def test_each_point_equals_the_expanded_units_across_sweep_keys_and_shards() -> None:
    manifest = Manifest.from_dict({
        "apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "grid"},
        "spec": {"task": "matmul", "params": {"dtype": "float32"},
                 "sweep": {"size": [8, 16, 32], "iterations": [1, 2]}}})
    points = manifest.points()
    assert len(points) == 6 and len({str(p) for p in points}) == 6
    assert [manifest.point(i) for i in range(len(points))] == points
    for outside in (-1, len(points)):
        with pytest.raises(IndexError):
            manifest.point(outside)


def test_points_of_a_sharded_input_follow_the_shards_innermost() -> None:
    manifest = Manifest.from_dict({
        "apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "rows"},
        "spec": {"task": "inference", "params": {"arch": "export", "input_key": "x"},
                 "sweep": {"batch_size": [4, 8]},
                 "inputs": {"model": {"blob": "b" * 64},
                            "data": {"blob": "a" * 64, "shard": {"by": "rows", "count": 3}, "rows": 9}}}})
    points = manifest.points()
    assert len(points) == 6 and points[1]["row_start"] == 3
    assert [manifest.point(i) for i in range(6)] == points
