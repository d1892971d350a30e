"""When the agent must stand aside: the volunteer's pause rules, evaluated on every tick.

The agent asks :meth:`PauseRules.evaluate` before taking new work (and to decide whether to
suspend running work); it answers ``(paused, reason)`` with the first rule that applies, in this
order: manual pause, battery, time windows, daily compute cap, an exclusive app running, owner
activity. With the decision it keeps :attr:`PauseRules.expected_s`, how long the pause is expected
to last, so a long one hands its tasks back (:mod:`agent.daemon.pausing`). GPU work has one more
rule of its own, :meth:`PauseRules.evaluate_gpu` (BOINC's "use GPU while computer is in use").
The clock and the load source are injected so the rules are tested with a fake clock and fake load,
and the real :class:`SystemLoad` (psutil, logind) is a thin adapter tested on its own.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import NamedTuple, Protocol

import psutil

from agent.volunteer.exclusive_apps import running_exclusive
from agent.volunteer.preferences import Preferences, TimeWindow

__all__ = ["Clock", "LoadSource", "PauseDecision", "PauseRules", "SystemClock", "SystemLoad"]

log = logging.getLogger(__name__)

USAGE_SAVE_INTERVAL_S = 60.0
#: how far ahead the time windows are searched for the next opening (a pause this long is "long")
WINDOW_LOOKAHEAD_S = 2 * 24 * 3600.0
LOGINCTL_TIMEOUT_S = 2.0


class Clock(Protocol):
    def now(self) -> datetime:
        """The current local time, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now().astimezone()


class LoadSource(Protocol):
    def owner_cpu_percent(self) -> float:
        """CPU use of everything but the agent and its children, 0-100 of the whole machine."""
        ...

    def seconds_since_input(self) -> float | None:
        """Seconds since the owner last used keyboard or mouse; None where undetectable."""
        ...

    def on_battery(self) -> bool | None:
        """True when running on battery; None when unknown or there is no battery."""
        ...


class PauseDecision(NamedTuple):
    paused: bool
    reason: str


RUNNING = PauseDecision(False, "")


@dataclass
class _ManualPause:
    until: datetime | None  # None = until resumed
    reason: str


class PauseRules:
    """Evaluates the volunteer's rules. ``prefs`` is a callable so hot-reloaded preferences apply
    at once (pass ``PreferencesFile(...).current`` via a lambda, or a fixed object).

    Idle detection has hysteresis: once the owner is seen busy (CPU over the threshold or recent
    input) the agent stays paused until the machine has been idle ``idle_minutes``. The agent's
    start counts as a busy moment, so an idle-only agent first waits out one idle period.
    The daily compute used is kept in ``usage_path`` (when given) so a restart does not reset it."""

    def __init__(self, prefs: Callable[[], Preferences] | Preferences, load: LoadSource,
                 clock: Clock | None = None, *, usage_path: Path | None = None,
                 exclusive: Callable[[tuple[str, ...]], str | None] = running_exclusive) -> None:
        self._prefs = prefs if callable(prefs) else (lambda: prefs)
        self._exclusive = exclusive
        #: how long the last pause decision is expected to last, in seconds: inf for "until someone acts"
        #: or "for days", None when nobody can tell (the owner's activity, a running app); 0 when running
        self.expected_s: float | None = 0.0
        self._load = load
        self._clock = clock or SystemClock()
        self._manual: _ManualPause | None = None
        self._last_busy: datetime = self._clock.now()
        self._usage_path = usage_path
        self._usage_day, self._usage_s = self._load_usage()
        self._usage_saved_s = self._usage_s

    # -- manual pause ----------------------------------------------------------------------------
    def pause(self, for_s: float | None = None, reason: str = "paused by the owner") -> None:
        """Pause now, for ``for_s`` seconds or until :meth:`resume`."""
        if for_s is not None and for_s <= 0:
            raise ValueError("a pause must last a positive number of seconds")
        until = None if for_s is None else self._clock.now() + timedelta(seconds=for_s)
        self._manual = _ManualPause(until, reason or "paused by the owner")

    def resume(self) -> None:
        """Lift a manual pause. The other rules still apply."""
        self._manual = None

    @property
    def manual_until(self) -> datetime | None:
        return self._manual.until if self._manual else None

    # -- compute accounting ----------------------------------------------------------------------
    def record_compute(self, seconds: float) -> None:
        """Add wall seconds during which at least one task ran (the agent calls this per tick)."""
        self._roll_day()
        self._usage_s += max(0.0, seconds)
        if self._usage_s - self._usage_saved_s >= USAGE_SAVE_INTERVAL_S:
            self._save_usage()

    @property
    def compute_today_s(self) -> float:
        self._roll_day()
        return self._usage_s

    def _roll_day(self) -> None:
        today = self._clock.now().date()
        if today != self._usage_day:
            self._usage_day, self._usage_s, self._usage_saved_s = today, 0.0, 0.0

    def _load_usage(self) -> tuple[date, float]:
        today = self._clock.now().date()
        if self._usage_path is None:
            return today, 0.0
        try:
            data = json.loads(self._usage_path.read_text(encoding="utf-8"))
            if data.get("date") == today.isoformat():
                return today, float(data["compute_s"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable compute usage file %s: %s", self._usage_path, exc)
        return today, 0.0

    def _save_usage(self) -> None:
        self._usage_saved_s = self._usage_s
        if self._usage_path is None:
            return
        tmp = self._usage_path.with_name(self._usage_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"date": self._usage_day.isoformat(), "compute_s": self._usage_s}))
            os.replace(tmp, self._usage_path)
        except OSError as exc:
            log.warning("cannot save compute usage to %s: %s", self._usage_path, exc)

    def flush(self) -> None:
        """Persist the compute used today (call at shutdown)."""
        self._roll_day()
        self._save_usage()

    # -- the rules -------------------------------------------------------------------------------
    def evaluate(self) -> PauseDecision:
        """(paused, reason): the first rule that says stop, or (False, ""); sets :attr:`expected_s`."""
        decision, self.expected_s = self._evaluate()
        return decision

    def _evaluate(self) -> tuple[PauseDecision, float | None]:
        prefs = self._prefs()
        now = self._clock.now()
        if self._manual is not None:
            if self._manual.until is None:   # nobody can tell when the owner resumes
                return PauseDecision(True, f"{self._manual.reason} (until `panal agent resume`)"), None
            if now < self._manual.until:
                until = f"{self._manual.until:%Y-%m-%d %H:%M}"
                left = (self._manual.until - now).total_seconds()
                return PauseDecision(True, f"{self._manual.reason} (until {until})"), left
            self._manual = None
        if prefs.pause_on_battery and self._load.on_battery():
            return PauseDecision(True, "on battery power"), float("inf")   # a laptop on the move
        if prefs.time_windows and not any(w.contains(now) for w in prefs.time_windows):
            allowed = "; ".join(str(w) for w in prefs.time_windows)
            return PauseDecision(True, f"outside the allowed hours ({allowed})"), \
                _until_open(prefs.time_windows, now)
        if prefs.daily_cap_hours is not None and self.compute_today_s >= prefs.daily_cap_hours * 3600:
            if self._usage_s != self._usage_saved_s:
                self._save_usage()  # so a crash-and-restart cannot run past the cap
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
            return PauseDecision(True, f"daily compute cap of {prefs.daily_cap_hours:g} h reached"), \
                (midnight - now).total_seconds()
        app = self._exclusive(prefs.exclusive_apps) if prefs.exclusive_apps else None
        if app is not None:
            return PauseDecision(True, f"{app} is running (an exclusive app)"), None
        if prefs.idle_only:
            decision = self._idle_decision(prefs, now)
            return decision, (None if decision.paused else 0.0)
        return RUNNING, 0.0

    def evaluate_gpu(self) -> PauseDecision:
        """Whether GPU work must stand aside while all other work may run: the owner is at the machine
        (keyboard or mouse within ``idle_minutes``) and did not lend the GPU then (``gpu_while_in_use``).

        Input only, as BOINC's "in use": the owner's CPU load says nothing about the GPU (the GPU rules
        of :mod:`agent.volunteer.gpu_use` see a game), and a server with no graphical session (no input
        to tell) lends its GPUs at once instead of waiting out an idle period after every start."""
        prefs = self._prefs()
        if prefs.gpu_while_in_use or prefs.idle_only:   # idle_only already stops everything
            return RUNNING
        since_input = self._load.seconds_since_input()
        if since_input is not None and since_input < prefs.idle_minutes * 60:
            return PauseDecision(True, f"GPU work waits: the owner is at the machine (input {_ago(since_input)} "
                                       f"ago; waiting for {prefs.idle_minutes:g} min idle)")
        return RUNNING

    def _idle_decision(self, prefs: Preferences, now: datetime) -> PauseDecision:
        wait_s = prefs.idle_minutes * 60
        cpu = self._load.owner_cpu_percent()
        if cpu > prefs.idle_cpu_percent:
            self._last_busy = now
            return PauseDecision(True, f"the owner is using the machine (CPU {cpu:.0f}% > "
                                       f"{prefs.idle_cpu_percent:g}%)")
        since_input = self._load.seconds_since_input()
        if since_input is not None and since_input < wait_s:
            return PauseDecision(True, f"the owner is active (input {_ago(since_input)} ago; waiting for "
                                       f"{prefs.idle_minutes:g} min idle)")
        idle_s = (now - self._last_busy).total_seconds()
        if idle_s < wait_s:
            return PauseDecision(True, f"waiting for {prefs.idle_minutes:g} min idle "
                                       f"(idle for {_ago(idle_s)})")
        return RUNNING


def _until_open(windows: tuple[TimeWindow, ...], now: datetime) -> float:
    """Seconds until one of ``windows`` opens (minute steps), inf when none does within two days."""
    opens = _next_open(windows, now.replace(second=0, microsecond=0))
    return float("inf") if opens is None else (opens - now).total_seconds()


@functools.lru_cache(maxsize=8)
def _next_open(windows: tuple[TimeWindow, ...], minute: datetime) -> datetime | None:
    """The first whole minute after ``minute`` in one of ``windows``; cached: a paused agent asks every
    second, and a search of two days of minutes costs milliseconds."""
    step = timedelta(minutes=1)
    moment = minute + step
    for _ in range(int(WINDOW_LOOKAHEAD_S // 60)):
        if any(w.contains(moment) for w in windows):
            return moment
        moment += step
    return None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


class SystemLoad:
    """The real load source: psutil for CPU and battery, logind's IdleHint for input on Linux.

    Owner CPU excludes this process and its children, so the agent's own work never pauses it.
    IdleHint is only trusted on graphical sessions (x11/wayland/mir), where the desktop maintains
    it; text and ssh sessions never set it and would look "active" forever."""

    def __init__(self, *, agent_pid: int | None = None, input_poll_s: float = 10.0) -> None:
        self._agent = psutil.Process(agent_pid or os.getpid())
        self._procs: dict[int, psutil.Process] = {}
        self._cpus = psutil.cpu_count() or 1
        self._input_poll_s = input_poll_s
        self._input_checked = float("-inf")
        self._input_idle_since: float | None = None
        self._loginctl = shutil.which("loginctl")
        psutil.cpu_percent(interval=None)  # prime: the first call has no baseline

    def owner_cpu_percent(self) -> float:
        total = psutil.cpu_percent(interval=None)
        mine = 0.0
        try:
            procs = [self._agent, *self._agent.children(recursive=True)]
        except psutil.Error:
            procs = []
        seen = set()
        for proc in procs:
            cached = self._procs.setdefault(proc.pid, proc)  # cpu_percent needs the same object
            seen.add(proc.pid)
            try:
                mine += cached.cpu_percent(interval=None) / self._cpus
            except psutil.Error:
                continue
        for pid in set(self._procs) - seen:
            del self._procs[pid]
        return max(0.0, total - mine)

    def on_battery(self) -> bool | None:
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError):
            return None
        if battery is None or battery.power_plugged is None:
            return None
        return not battery.power_plugged

    def seconds_since_input(self) -> float | None:
        now = time.time()
        if time.monotonic() - self._input_checked >= self._input_poll_s:
            self._input_checked = time.monotonic()
            self._input_idle_since = self._query_logind(now)
        if self._input_idle_since is None:
            return None
        return max(0.0, now - self._input_idle_since)

    def _query_logind(self, now: float) -> float | None:
        """Epoch seconds since which every graphical session has been idle; now if one is active."""
        if self._loginctl is None:
            return None
        sessions = _run([self._loginctl, "list-sessions", "--no-legend"])
        if sessions is None:
            return None
        idle_since: list[float] = []
        for line in sessions.splitlines():
            fields = line.split()
            if not fields:
                continue
            props = _run([self._loginctl, "show-session", fields[0], "-p", "Type", "-p", "IdleHint",
                          "-p", "IdleSinceHint", "-p", "Active"])
            if props is None:
                continue
            info = dict(p.split("=", 1) for p in props.splitlines() if "=" in p)
            if info.get("Type") not in ("x11", "wayland", "mir"):
                continue
            if info.get("IdleHint") != "yes":
                idle_since.append(now)
                continue
            try:
                idle_since.append(int(info.get("IdleSinceHint", "0")) / 1e6)
            except ValueError:
                continue
        return max(idle_since) if idle_since else None


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=LOGINCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
