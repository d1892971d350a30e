"""Volunteer preferences: how much of this machine panal may use, and when.

Stored as ``prefs.yaml`` in the agent's home so a volunteer can edit it by hand or with
``panal agent set KEY VALUE``; the running agent picks changes up through
:meth:`PreferencesFile.reload_if_changed` (a stat call, cheap enough for every scheduling tick).
Every value is validated on load and on set, so a typo gives a clear message naming the key and
the accepted form instead of an agent that quietly ignores it. The rules that read these values
live in :mod:`agent.volunteer.pause_rules`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import yaml

from security.errors import BadRequest

__all__ = [
    "PreferenceError",
    "Preferences",
    "PreferencesFile",
    "TimeWindow",
    "load_preferences",
    "save_preferences",
    "set_preference",
]

log = logging.getLogger(__name__)

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_GROUPS = {"daily": range(7), "everyday": range(7), "weekdays": range(5), "weekends": range(5, 7)}
_WINDOW_RE = re.compile(
    r"^\s*(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


class PreferenceError(BadRequest):
    """A preference key or value is invalid; ``key`` names it."""

    code = "bad_preference"

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}" if key else detail, details={"key": key})
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class TimeWindow:
    """Days plus a start-end time of day. A window that ends at or before it starts runs past
    midnight and belongs to the day it starts on: ``weekdays 19:00-08:00`` covers Friday night
    until Saturday 08:00, but not Sunday night."""

    days: frozenset[int]  # 0 = Monday
    start: time
    end: time | None  # None = 24:00

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        m = _WINDOW_RE.match(text.lower())
        if not m:
            raise ValueError(f"{text!r} is not a time window like 'weekdays 19:00-08:00' "
                             "or 'sat,sun 00:00-24:00'")
        days = _parse_days(m["days"] or "daily")
        start, end = _parse_clock(m["start"], allow_24=False), _parse_clock(m["end"], allow_24=True)
        if start is None:
            raise ValueError(f"{text!r}: a window cannot start at 24:00")
        if start == end:
            raise ValueError(f"{text!r} is an empty window: start and end are the same time")
        return cls(days, start, end)

    def contains(self, moment: datetime) -> bool:
        t = moment.timetz().replace(tzinfo=None)
        if self.end is None or self.start < self.end:
            return moment.weekday() in self.days and t >= self.start and (self.end is None or t < self.end)
        yesterday = (moment - timedelta(days=1)).weekday()
        started_today = moment.weekday() in self.days and t >= self.start
        return started_today or (yesterday in self.days and t < self.end)

    def __str__(self) -> str:
        if self.days == frozenset(range(7)):
            days = "daily"
        elif self.days == frozenset(range(5)):
            days = "weekdays"
        elif self.days == frozenset(range(5, 7)):
            days = "weekends"
        else:
            days = ",".join(_DAYS[d] for d in sorted(self.days))
        end = "24:00" if self.end is None else self.end.strftime("%H:%M")
        return f"{days} {self.start.strftime('%H:%M')}-{end}"


def _parse_days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        if part in _DAY_GROUPS:
            days.update(_DAY_GROUPS[part])
        elif "-" in part:
            first, _, last = part.partition("-")
            if first not in _DAYS or last not in _DAYS:
                raise ValueError(f"unknown day range {part!r}: use mon..sun, e.g. mon-fri")
            a, b = _DAYS.index(first), _DAYS.index(last)
            days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(b + 1)])
        elif part in _DAYS:
            days.add(_DAYS.index(part))
        else:
            raise ValueError(f"unknown day {part!r}: use mon..sun, mon-fri, weekdays, weekends or daily")
    return frozenset(days)


def _parse_clock(text: str, *, allow_24: bool) -> time | None:
    hours, minutes = (int(x) for x in text.split(":"))
    if allow_24 and (hours, minutes) == (24, 0):
        return None
    if hours > 23 or minutes > 59:
        raise ValueError(f"{text!r} is not a time of day (00:00-23:59)")
    return time(hours, minutes)


@dataclass(frozen=True)
class Preferences:
    """What the volunteer lends. ``None`` means "no limit" / "all"."""

    cpu_threads: int | None = None            # threads a task may use; None = all cores
    gpus: tuple[int | str, ...] | None = None  # GPUs to lend (indices or UUIDs); None = all, () = none
    exclude_gpus: tuple[int | str, ...] = ()  # GPUs never lent (indices or UUIDs), whatever ``gpus`` says
    # Half, not 0.9: a stopped task keeps its GPU memory, so the owner's game must fit beside it.
    max_gpu_memory_fraction: float = 0.5      # of each lent GPU's memory
    # BOINC's "use GPU while computer is in use", off: a GPU has no priorities, so a task beside a game
    # takes its frames; CPU work runs at nice 19 and may go on (``idle_only`` stops that too).
    gpu_while_in_use: bool = False
    gpu_pause_percent: float = 20.0           # another program's GPU use above this pauses GPU work there
    gpu_pause_memory_fraction: float = 0.25   # another program's share of a GPU's memory above this, too
    exclusive_apps: tuple[str, ...] = ()      # programs that pause all work while they run (process names)
    handback_minutes: float = 10.0            # a pause expected to last (or lasting) longer hands tasks back
    max_concurrent_tasks: int = 1
    idle_only: bool = False                   # run only when the owner is not using the machine
    idle_cpu_percent: float = 25.0            # owner CPU use above this counts as "in use"
    idle_minutes: float = 5.0                 # resume after the machine has been idle this long
    time_windows: tuple[TimeWindow, ...] = ()  # allowed hours; () = any time
    pause_on_battery: bool = True
    daily_cap_hours: float | None = None      # compute hours per local day; None = no cap
    max_memory_gb: float | None = None        # RAM one task may use (enforced, advertised); None = no ceiling
    worker_idle_minutes: float | None = 3.0   # a warm worker (~200 MB) exits after this long without work; None = never

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("gpus", "exclude_gpus", "exclusive_apps") and value is not None:
                value = list(value)
            elif f.name == "time_windows":
                value = [str(w) for w in value]
            out[f.name] = value
        return out

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Preferences:
        values = {key: _parse_value(key, raw) for key, raw in data.items()}
        return cls(**values)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false (yes/no, on/off), got {raw!r}")


def _to_number(raw: Any, kind: type[float] | type[int], *, low: float, high: float | None) -> Any:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    try:
        value = kind(raw) if kind is float else int(str(raw).strip())
    except ValueError:
        raise ValueError(f"expected {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
    if value != value or value < low or (high is not None and value > high):  # NaN fails too
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ValueError(f"must be {bound}, got {raw!r}")
    return value


def _optional(raw: Any, parse: Callable[[Any], Any], none_words: tuple[str, ...]) -> Any:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in none_words):
        return None
    return parse(raw)


_UUID_RE = re.compile(r"^(?:gpu-)?[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}$")


def _to_gpus(raw: Any) -> tuple[int | str, ...] | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "all"):
        return None
    return _to_gpu_list(raw)


def _to_gpu_list(raw: Any) -> tuple[int | str, ...]:
    """GPU indices (0, 1) or UUIDs (``GPU-4f...`` as nvidia-smi -L prints them; stored lower case,
    without the prefix, the form torch reports); ``none`` or nothing is the empty list."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "")):
        return ()
    items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
    picked: set[int | str] = set()
    for item in items:
        text = str(item).strip().lower()
        if _UUID_RE.match(text):
            picked.add(text.removeprefix("gpu-"))
            continue
        try:
            index = int(text)
        except ValueError:
            raise ValueError(f"expected 'all', 'none' or GPU indices like 0,1 or UUIDs like "
                             f"GPU-8c3e1a52-...; got {raw!r}") from None
        if index < 0:
            raise ValueError(f"GPU indices start at 0, got {index}")
        picked.add(index)
    return tuple(sorted(picked, key=lambda g: (isinstance(g, str), str(g).zfill(4))))


def _to_names(raw: Any) -> tuple[str, ...]:
    """Program names (as ``ps -e`` shows them), comma-separated or a list."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "")):
        return ()
    items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
    names = []
    for item in items:
        name = str(item).strip()
        if not name:
            continue
        if "/" in name or len(name) > 255:
            raise ValueError(f"expected program names like steam,blender (no paths); got {item!r}")
        names.append(name)
    return tuple(dict.fromkeys(names))


def _to_windows(raw: Any) -> tuple[TimeWindow, ...]:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "always", "any", "none")):
        return ()
    items = raw if isinstance(raw, list | tuple) else str(raw).split(";")
    return tuple(TimeWindow.parse(str(item)) for item in items if str(item).strip())


_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "cpu_threads": (lambda r: _optional(r, lambda v: _to_number(v, int, low=1, high=None), ("all", "auto")),
                    "a number of threads, or 'all'"),
    "gpus": (_to_gpus, "'all', 'none' or GPU indices like 0,1 or UUIDs"),
    "exclude_gpus": (_to_gpu_list, "'none' or GPU indices like 1 or UUIDs"),
    "max_gpu_memory_fraction": (lambda r: _to_number(r, float, low=0.05, high=1.0),
                                "a fraction between 0.05 and 1, e.g. 0.8"),
    "gpu_while_in_use": (_to_bool, "true or false"),
    "gpu_pause_percent": (lambda r: _to_number(r, float, low=1, high=100), "a percentage, e.g. 20"),
    "gpu_pause_memory_fraction": (lambda r: _to_number(r, float, low=0.01, high=1.0),
                                  "a fraction between 0.01 and 1, e.g. 0.25"),
    "exclusive_apps": (_to_names, "program names like steam,blender, or 'none'"),
    "handback_minutes": (lambda r: _to_number(r, float, low=0, high=24 * 60), "minutes, e.g. 10"),
    "max_concurrent_tasks": (lambda r: _to_number(r, int, low=1, high=256), "a whole number >= 1"),
    "idle_only": (_to_bool, "true or false"),
    "idle_cpu_percent": (lambda r: _to_number(r, float, low=1, high=100), "a percentage, e.g. 25"),
    "idle_minutes": (lambda r: _to_number(r, float, low=0, high=24 * 60), "minutes, e.g. 5"),
    "time_windows": (_to_windows, "'always' or windows like 'weekdays 19:00-08:00; weekends 00:00-24:00'"),
    "pause_on_battery": (_to_bool, "true or false"),
    "daily_cap_hours": (lambda r: _optional(r, lambda v: _to_number(v, float, low=0, high=24),
                                            ("none", "off")),
                        "hours per day (0-24), or 'none'"),
    "max_memory_gb": (lambda r: _optional(r, lambda v: _to_number(v, float, low=0.25, high=None), ("none", "off")),
                      "GB of RAM one task may use (at least 0.25), or 'none'"),
    "worker_idle_minutes": (lambda r: _optional(r, lambda v: _to_number(v, float, low=0, high=24 * 60),
                                                ("never", "none", "off")),
                            "minutes a warm worker waits for work before it exits (0-1440), or 'never'"),
}
assert set(_PARSERS) == {f.name for f in fields(Preferences)}


def _parse_value(key: str, raw: Any) -> Any:
    if key not in _PARSERS:
        close = difflib.get_close_matches(key, _PARSERS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PreferenceError(key, f"unknown preference{hint}; known: {', '.join(_PARSERS)}")
    parse, expected = _PARSERS[key]
    try:
        return parse(raw)
    except (ValueError, TypeError) as exc:
        raise PreferenceError(key, f"{exc} (expected {expected})") from None


def load_preferences(path: Path) -> Preferences:
    """The preferences in ``path``; defaults when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Preferences()
    except OSError as exc:
        raise PreferenceError("", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PreferenceError("", f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return Preferences()
    if not isinstance(data, dict):
        raise PreferenceError("", f"{path}: expected a map of preferences like 'idle_only: true'")
    try:
        return Preferences.from_mapping(data)
    except PreferenceError as exc:
        raise PreferenceError(exc.key, f"{exc.detail} (in {path})") from None


def save_preferences(path: Path, prefs: Preferences) -> None:
    """Write atomically (temp file + rename) so the agent never reloads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("# panal volunteer preferences; change with `panal agent set KEY VALUE`\n"
                   + yaml.safe_dump(prefs.to_yaml_dict(), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def set_preference(path: Path, key: str, value_text: str) -> Preferences:
    """Validate ``value_text`` for ``key``, store it in ``path``; returns the new preferences."""
    key = key.strip().lower().replace("-", "_")
    value = _parse_value(key, value_text)
    prefs = dataclasses.replace(load_preferences(path), **{key: value})
    save_preferences(path, prefs)
    return prefs


class PreferencesFile:
    """The preferences file as the running agent sees it, reloaded when it changes on disk.

    A broken edit keeps the last good preferences (and logs why) rather than stopping the agent;
    ``error`` holds the message until the file is fixed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = self._stat()
        self.current = load_preferences(path)
        self.error: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Reload when the file's mtime, size or inode changed; True when ``current`` changed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            prefs = load_preferences(self.path)
        except PreferenceError as exc:
            if exc.message != self.error:
                log.warning("keeping the previous preferences: %s", exc.message)
            self.error = exc.message
            return False
        self.error = None
        changed = prefs != self.current
        self.current = prefs
        return changed
