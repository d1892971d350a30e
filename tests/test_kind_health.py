"""The per-kind breaker: a kind that keeps failing on this machine stops being advertised, then is probed."""

from __future__ import annotations

from helpers import FakeClock

from agent.daemon.kind_health import KindHealth


def test_machine_failures_disable_a_kind_until_the_cooldown_then_a_probe_decides() -> None:
    clock = FakeClock()
    health = KindHealth(threshold=3, cooldown_s=60, clock=clock)
    kinds = ["matmul", "conv2d"]
    assert not health.record("conv2d", False, "crashed", "SIGSEGV")
    assert not health.record("conv2d", False, "invalid_params", "bad")   # the task's fault: not counted
    assert not health.record("conv2d", False, "device_lost", "cuda error")
    assert health.record("conv2d", False, "crashed", "SIGSEGV")          # third machine failure: disabled
    assert health.advertised(kinds) == ["matmul"]
    assert "3 failures in a row" in health.disabled()["conv2d"]
    clock.now = 61                                                       # cool-down over: probe it again
    assert health.advertised(kinds) == kinds
    health.record("conv2d", False, "crashed", "again")                   # the probe failed: off, longer
    assert health.advertised(kinds) == ["matmul"]
    clock.now = 61 + 121                                                 # the doubled cool-down
    assert health.advertised(kinds) == kinds
    assert health.record("conv2d", True, None, None)                     # the probe worked: closed again
    assert health.disabled() == {}


def test_timeouts_and_successes_of_other_kinds_do_not_disable() -> None:
    health = KindHealth(threshold=2, cooldown_s=60, clock=FakeClock())
    for _ in range(5):
        health.record("sleep", False, "timeout", "too slow")
        health.record("matmul", True, None, None)
    assert health.disabled() == {}


def test_a_hostile_submitters_crashes_do_not_switch_off_the_python_kind() -> None:
    health = KindHealth(threshold=2, cooldown_s=60, clock=FakeClock())
    for failure in ("crashed", "oom", "error", "crashed"):
        assert health.record("python", False, failure, "the submitter's code") is False
    assert "python" not in health.disabled() and health.advertised(["python", "sleep"]) == ["python", "sleep"]
