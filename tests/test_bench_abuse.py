"""`panal bench abuse --quick`: the benchmark runs end to end against a real, WAN-configured hub and reports
every figure.

A smoke test of the bench's shape and of what it attacks, not a measurement: goals are judged by the full
run (a benchmark), never by a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import panal

PROBES = {"registration_flood", "idle", "slowloris", "sse_viewers", "unsigned_body_flood"}
PER_ADDRESS_CAP = 64   # hub/config.py max_connections_per_address, the default the bench's hub keeps


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


def test_quick_abuse_bench_attacks_a_hub_with_its_wan_defences_on(tmp_path: Path) -> None:
    """The hub is not a local-only board: honest agents need the admission token (they still got work), the
    tokenless flood registers nobody, and the attacker's one address holds at most the per-address cap of
    connections (the bench used to serve on 127.0.0.1, where both defences are off)."""
    out = json.loads(panal("bench", "abuse", "--quick", "--json", home=tmp_path, timeout=240).stdout)
    assert out["hub"]["registration"] == "token" and not out["hub"]["url"].startswith("https://127.0.0.1:")
    assert out["baseline"]["tasks_per_s"] > 0
    assert out["probes"]["registration_flood"]["registered"] == 0
    held = out["probes"]["idle"]["open_at_end"] + out["probes"]["slowloris"]["open_at_end"]
    assert held <= PER_ADDRESS_CAP
    assert out["probes"]["idle"]["refused_at_connect"], "idle + slowloris exceed the cap: some must be refused"


def test_quick_abuse_bench_with_open_registration_rate_limits_the_flood(tmp_path: Path) -> None:
    out = json.loads(panal("bench", "abuse", "--quick", "--probes", "registration_flood", "--open-registration",
                           "--json", home=tmp_path, timeout=240).stdout)
    assert out["hub"]["registration"] == "open" and set(out["probes"]) == {"registration_flood"}
    flood = out["probes"]["registration_flood"]
    assert flood["statuses"].get("429", 0) > 0
    assert 0 < flood["registered"] <= 11   # a burst of 10 from the one address, +1 if a refill came in


def test_abuse_bench_refuses_an_unknown_probe(tmp_path: Path) -> None:
    proc = panal("bench", "abuse", "--quick", "--probes", "idle,teleport", home=tmp_path, check=False)
    assert proc.returncode != 0 and "teleport" in proc.stderr and "Traceback" not in proc.stderr
