"""`panal bench abuse --quick`: the benchmark runs end to end against a real hub and reports every figure.

A smoke test of the bench's shape, not a measurement: goals are judged by the full run (a benchmark),
never by a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import panal

PROBES = {"registration_flood", "idle", "slowloris", "sse_viewers", "unsigned_body_flood"}


def test_quick_abuse_bench_reports_both_phases_and_every_probe(tmp_path: Path) -> None:
    out = json.loads(panal("bench", "abuse", "--quick", "--json", home=tmp_path, timeout=240).stdout)
    for phase in ("baseline", "attack"):
        assert set(out[phase]) == {"tasks_per_s", "leases", "lease_ms_p50", "lease_ms_p99", "hub_peak_rss_mb"}
    assert out["baseline"]["tasks_per_s"] > 0 and out["baseline"]["hub_peak_rss_mb"] > 0
    assert set(out["probes"]) == PROBES
    size = out["size"]
    assert out["probes"]["idle"]["attempted"] == size["idle"]
    assert out["probes"]["slowloris"]["attempted"] == size["slowloris"]
    assert out["probes"]["sse_viewers"]["attempted"] == size["viewers"]
    assert out["probes"]["registration_flood"]["sent"] > 0 and out["probes"]["unsigned_body_flood"]["sent"] > 0
    assert set(out["goals"]) == {"throughput_ratio>=0.8", "lease_p99<250ms", "hub_peak_rss<300MB"}
