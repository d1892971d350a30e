"""Volunteer preferences and the pause rules, driven by a fake clock and a fake load source."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from agent.volunteer.pause_rules import PauseRules, SystemLoad
from agent.volunteer.preferences import (
    PreferenceError,
    Preferences,
    PreferencesFile,
    TimeWindow,
    load_preferences,
    set_preference,
)

TZ = timezone(timedelta(hours=2))
MONDAY = datetime(2025, 3, 3, 12, 0, tzinfo=TZ)  # a Monday


@dataclass
class FakeClock:
    current: datetime = MONDAY

    def now(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        self.current += timedelta(**delta)

    def at(self, day: int, hour: int, minute: int = 0) -> None:
        """Monday + ``day`` days at hour:minute."""
        self.current = (MONDAY + timedelta(days=day)).replace(hour=hour, minute=minute)


@dataclass
class FakeLoad:
    cpu: float = 0.0
    input_ago: float | None = None
    battery: bool | None = None

    def owner_cpu_percent(self) -> float:
        return self.cpu

    def seconds_since_input(self) -> float | None:
        return self.input_ago

    def on_battery(self) -> bool | None:
        return self.battery


def rules(prefs: Preferences, **load: float | bool | None) -> tuple[PauseRules, FakeClock, FakeLoad]:
    clock, fake = FakeClock(), FakeLoad(**load)  # type: ignore[arg-type]
    return PauseRules(prefs, fake, clock), clock, fake


# -- pause rules ------------------------------------------------------------------------------------
def test_no_rules_means_running() -> None:
    r, _, _ = rules(Preferences(), cpu=99.0, input_ago=0.0)
    assert r.evaluate() == (False, "")


def test_owner_cpu_above_threshold_pauses_until_idle_for_n_minutes() -> None:
    prefs = Preferences(idle_only=True, idle_cpu_percent=30, idle_minutes=5)
    r, clock, load = rules(prefs)
    clock.advance(minutes=5)
    assert not r.evaluate().paused  # idle since start for 5 min
    load.cpu = 31
    paused, reason = r.evaluate()
    assert paused and "CPU 31% > 30%" in reason
    load.cpu = 29  # below threshold, but not idle long enough yet
    clock.advance(minutes=4, seconds=59)
    paused, reason = r.evaluate()
    assert paused and "waiting for 5 min idle" in reason
    clock.advance(seconds=1)
    assert r.evaluate() == (False, "")
    load.cpu = 30  # at the threshold is not above it
    assert not r.evaluate().paused


def test_idle_only_agent_waits_one_idle_period_after_start() -> None:
    r, clock, _ = rules(Preferences(idle_only=True, idle_minutes=2))
    assert r.evaluate().paused
    clock.advance(minutes=2)
    assert not r.evaluate().paused


def test_recent_input_pauses_and_idle_input_allows() -> None:
    r, clock, load = rules(Preferences(idle_only=True, idle_minutes=10), input_ago=30.0)
    clock.advance(minutes=11)
    paused, reason = r.evaluate()
    assert paused and "input 30 s ago" in reason
    load.input_ago = 599.0
    assert r.evaluate().paused
    load.input_ago = 600.0
    assert not r.evaluate().paused
    load.input_ago = None  # undetectable: CPU alone decides
    assert not r.evaluate().paused


def test_idle_rules_do_not_apply_unless_idle_only() -> None:
    r, _, _ = rules(Preferences(idle_only=False), cpu=100.0, input_ago=0.0)
    assert not r.evaluate().paused


@pytest.mark.parametrize(("day", "hour", "minute", "allowed"), [
    (0, 18, 59, False),  # Monday before the window
    (0, 19, 0, True),    # Monday 19:00 starts it
    (1, 7, 59, True),    # Tuesday early morning: Monday's window runs past midnight
    (1, 8, 0, False),    # the end is exclusive
    (4, 23, 0, True),    # Friday night
    (5, 3, 0, True),     # Saturday 03:00: still Friday's window
    (5, 20, 0, False),   # Saturday evening: not a weekday start
    (6, 23, 30, False),  # Sunday night
    (0, 2, 0, False),    # Monday 02:00: Sunday's window does not exist
])
def test_time_window_across_midnight(day: int, hour: int, minute: int, allowed: bool) -> None:
    r, clock, _ = rules(Preferences(time_windows=(TimeWindow.parse("weekdays 19:00-08:00"),)))
    clock.at(day, hour, minute)
    paused, reason = r.evaluate()
    assert paused is not allowed
    if paused:
        assert "outside the allowed hours (weekdays 19:00-08:00)" in reason


def test_several_windows_any_one_allows() -> None:
    windows = (TimeWindow.parse("mon-fri 22:00-06:00"), TimeWindow.parse("sat,sun 00:00-24:00"))
    r, clock, _ = rules(Preferences(time_windows=windows))
    clock.at(5, 12)
    assert not r.evaluate().paused
    clock.at(6, 23, 59)
    assert not r.evaluate().paused
    clock.at(2, 12)
    assert r.evaluate().paused


@pytest.mark.parametrize("text", ["19-08", "weekdays 25:00-08:00", "funday 10:00-12:00", "10:00-10:00",
                                  "24:00-08:00", "mon-xyz 10:00-11:00"])
def test_bad_time_windows_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        TimeWindow.parse(text)


def test_window_text_round_trips() -> None:
    for text in ("weekdays 19:00-08:00", "weekends 00:00-24:00", "daily 01:30-02:00", "mon,wed,fri 09:00-17:00"):
        assert str(TimeWindow.parse(text)) == text
    assert str(TimeWindow.parse("fri-mon 10:00-11:00")) == "mon,fri,sat,sun 10:00-11:00"


def test_battery_pauses_only_when_asked() -> None:
    r, _, load = rules(Preferences(pause_on_battery=True), battery=True)
    assert r.evaluate() == (True, "on battery power")
    load.battery = None  # unknown / no battery
    assert not r.evaluate().paused
    r2, _, _ = rules(Preferences(pause_on_battery=False), battery=True)
    assert not r2.evaluate().paused


def test_daily_cap_pauses_and_resets_at_midnight(tmp_path: Path) -> None:
    clock, load = FakeClock(), FakeLoad()
    usage = tmp_path / "usage.json"
    r = PauseRules(Preferences(daily_cap_hours=2), load, clock, usage_path=usage)
    r.record_compute(3600)
    assert not r.evaluate().paused
    r.record_compute(3599)
    assert not r.evaluate().paused
    r.record_compute(1)
    assert r.evaluate() == (True, "daily compute cap of 2 h reached")
    # A restarted agent remembers today's use...
    again = PauseRules(Preferences(daily_cap_hours=2), load, clock, usage_path=usage)
    assert again.compute_today_s == 7200 and again.evaluate().paused
    # ...and a new day starts from zero.
    clock.at(1, 0, 0)
    assert again.evaluate() == (False, "")
    assert again.compute_today_s == 0


def test_manual_pause_expires_and_resume_lifts_it() -> None:
    r, clock, _ = rules(Preferences())
    r.pause(7200, "gaming")
    paused, reason = r.evaluate()
    assert paused and reason.startswith("gaming (until ")
    clock.advance(hours=1, minutes=59)
    assert r.evaluate().paused
    clock.advance(minutes=1)
    assert r.evaluate() == (False, "")
    assert r.manual_until is None
    r.pause(None)
    clock.advance(days=30)
    paused, reason = r.evaluate()
    assert paused and "panal agent resume" in reason
    r.resume()
    assert not r.evaluate().paused
    with pytest.raises(ValueError):
        r.pause(0)


def test_manual_pause_wins_over_other_reasons_and_resume_keeps_them() -> None:
    r, _, _ = rules(Preferences(pause_on_battery=True), battery=True)
    r.pause(60, "meeting")
    assert r.evaluate().reason.startswith("meeting")
    r.resume()
    assert r.evaluate() == (True, "on battery power")


def test_rules_follow_reloaded_preferences(tmp_path: Path) -> None:
    path = tmp_path / "prefs.yaml"
    prefs_file = PreferencesFile(path)
    r = PauseRules(lambda: prefs_file.current, FakeLoad(battery=True), FakeClock())
    assert r.evaluate().paused  # pause_on_battery defaults to true
    set_preference(path, "pause_on_battery", "no")
    assert prefs_file.reload_if_changed()
    assert not r.evaluate().paused


# -- preferences file -------------------------------------------------------------------------------
def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_preferences(tmp_path / "prefs.yaml") == Preferences()


def test_set_preference_parses_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "prefs.yaml"
    set_preference(path, "cpu-threads", "4")
    set_preference(path, "gpus", "1, 0")
    set_preference(path, "max_gpu_memory_fraction", "0.5")
    set_preference(path, "idle_only", "yes")
    set_preference(path, "time_windows", "weekdays 19:00-08:00; weekends 00:00-24:00")
    prefs = set_preference(path, "daily_cap_hours", "6")
    assert prefs == load_preferences(path)
    assert prefs.cpu_threads == 4 and prefs.gpus == (0, 1) and prefs.max_gpu_memory_fraction == 0.5
    assert prefs.idle_only is True and prefs.daily_cap_hours == 6.0
    assert [str(w) for w in prefs.time_windows] == ["weekdays 19:00-08:00", "weekends 00:00-24:00"]
    on_disk = yaml.safe_load(path.read_text())
    assert on_disk["gpus"] == [0, 1] and on_disk["time_windows"][0] == "weekdays 19:00-08:00"
    assert set_preference(path, "gpus", "none").gpus == ()
    assert set_preference(path, "gpus", "all").gpus is None
    assert set_preference(path, "daily_cap_hours", "none").daily_cap_hours is None
    assert set_preference(path, "cpu_threads", "all").cpu_threads is None
    assert [p.name for p in path.parent.iterdir()] == ["prefs.yaml"]  # no temp files left


@pytest.mark.parametrize(("key", "value", "message"), [
    ("cpu_thread", "4", "unknown preference (did you mean cpu_threads?)"),
    ("colour", "red", "unknown preference; known: cpu_threads"),
    ("cpu_threads", "four", "cpu_threads: expected a whole number, got 'four'"),
    ("cpu_threads", "0", "must be at least 1"),
    ("max_gpu_memory_fraction", "1.5", "must be between 0.05 and 1"),
    ("max_gpu_memory_fraction", "nan", "must be between"),
    ("max_concurrent_tasks", "2.5", "expected a whole number"),
    ("idle_only", "maybe", "expected true or false"),
    ("gpus", "0,x", "expected 'all', 'none' or GPU indices"),
    ("gpus", "-1", "GPU indices start at 0"),
    ("time_windows", "weekdays 7pm-8am", "is not a time window like"),
    ("daily_cap_hours", "25", "must be between 0 and 24"),
])
def test_set_preference_errors_are_clear(tmp_path: Path, key: str, value: str, message: str) -> None:
    path = tmp_path / "prefs.yaml"
    with pytest.raises(PreferenceError) as err:
        set_preference(path, key, value)
    assert message in err.value.message
    assert err.value.status == 400
    assert not path.exists()  # nothing written on a bad value


def test_broken_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "prefs.yaml"
    path.write_text("idle_only: [unclosed\n")
    with pytest.raises(PreferenceError, match="is not valid YAML"):
        load_preferences(path)
    path.write_text("- a list\n")
    with pytest.raises(PreferenceError, match="expected a map"):
        load_preferences(path)
    path.write_text("idle_minutes: -3\n")
    expected = r"idle_minutes: must be between 0 and 1440, got -3 .*\(in .*prefs\.yaml\)"
    with pytest.raises(PreferenceError, match=expected):
        load_preferences(path)


def test_hand_written_yaml_with_native_types_loads(tmp_path: Path) -> None:
    path = tmp_path / "prefs.yaml"
    path.write_text("gpus: [0]\nidle_only: true\ntime_windows: ['daily 22:00-06:00']\ncpu_threads: null\n")
    prefs = load_preferences(path)
    assert prefs.gpus == (0,) and prefs.idle_only and prefs.cpu_threads is None
    assert prefs.time_windows == (TimeWindow.parse("daily 22:00-06:00"),)


def test_reload_if_changed_is_cheap_and_keeps_the_last_good_prefs(tmp_path: Path) -> None:
    path = tmp_path / "prefs.yaml"
    watched = PreferencesFile(path)
    assert not watched.reload_if_changed()  # nothing there, nothing changed
    set_preference(path, "max_concurrent_tasks", "3")
    assert watched.reload_if_changed() and watched.current.max_concurrent_tasks == 3
    assert not watched.reload_if_changed()  # unchanged file: no reload
    stat = path.stat()
    path.write_text("max_concurrent_tasks: lots\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not watched.reload_if_changed()
    assert watched.current.max_concurrent_tasks == 3  # the agent keeps going on the last good prefs
    assert watched.error is not None and "max_concurrent_tasks" in watched.error
    with pytest.raises(PreferenceError, match="got 'lots'"):  # set refuses to build on a broken file
        set_preference(path, "max_concurrent_tasks", "2")
    path.write_text("max_concurrent_tasks: 2\n")
    assert watched.reload_if_changed() and watched.current == replace(Preferences(), max_concurrent_tasks=2)
    assert watched.error is None
    path.unlink()
    assert watched.reload_if_changed() and watched.current == Preferences()


# -- the real load source ---------------------------------------------------------------------------
def test_system_load_reports_plausible_values() -> None:
    load = SystemLoad(input_poll_s=0.0)
    cpu = load.owner_cpu_percent()
    assert 0.0 <= cpu <= 100.0
    assert load.on_battery() in (True, False, None)
    since = load.seconds_since_input()
    assert since is None or since >= 0.0


def test_system_load_excludes_the_agents_own_children() -> None:
    """A busy child of the agent is the agent's work, not the owner's."""
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        load = SystemLoad()
        load.owner_cpu_percent()
        mine = 0.0
        deadline = datetime.now() + timedelta(seconds=5)
        while datetime.now() < deadline and mine == 0.0:
            subprocess.run(["sleep", "0.3"], check=True)
            total = load.owner_cpu_percent()
            mine = sum(p.cpu_percent(None) for p in load._procs.values())
            assert total >= 0.0
        assert busy.pid in load._procs  # the child was counted as the agent's
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.skipif(shutil.which("loginctl") is None, reason="no loginctl on this machine")
def test_logind_query_handles_no_graphical_session() -> None:
    load = SystemLoad(input_poll_s=0.0)
    # On a server or CI there is no x11/wayland session: undetectable, never "active forever".
    assert load._query_logind(0.0) is None or load._query_logind(0.0) >= 0.0
