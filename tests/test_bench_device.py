"""`panal bench device` runs every kind through the real engine and draws its chart even with no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import panal

pytestmark = pytest.mark.slow


def test_bench_device_reports_overheads_and_writes_a_png(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    out = panal("bench", "device", "--chart", str(chart), "--repeats", "1", "--json", home=tmp_path, timeout=300)
    result = json.loads(out.stdout)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {row["kind"] for row in result["kinds"]} >= {"matmul", "vector_add", "conv2d", "mlp_train"}
    assert all(isinstance(row["cpu"], float) and row["cpu"] > 0 for row in result["kinds"])
    assert result["cold_start_ms"] > result["warm_task_roundtrip_ms"] > 0
    assert result["matmul_1s"]["engine_s"] > 0 and result["matmul_1s"]["direct_s"] > 0
