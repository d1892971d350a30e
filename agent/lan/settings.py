"""LAN mode's settings: the ``lan:`` section of ``HOME/agent.yaml``, env ``PANAL_LAN_<NAME>``, flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from security.errors import BadRequest

__all__ = ["ENV_PREFIX", "LanSettings"]

ENV_PREFIX = "PANAL_LAN_"


@dataclass(frozen=True)
class LanSettings:
    """The ``lan:`` section of ``HOME/agent.yaml``; env ``PANAL_LAN_<NAME>`` and flags override it."""

    enabled: bool = True
    port: int = 0                          # the embedded board's port (0: any free one)
    interfaces: tuple[str, ...] = ()       # allow list: interface names or networks; empty: all private
    allow_public: bool = False             # announce and serve on globally routable addresses too
    ipv6: bool = False
    bind: str = ""                         # "": the allowed addresses only; e.g. "0.0.0.0" to bind all
    open: bool = False                     # run LAN work from any submitter (logged loudly)
    ttl_s: float = 10.0                    # a peer silent this long is dropped
    refresh_s: float = 3.0                 # our re-announcement period (< ttl_s)
    max_failures: int = 3                  # failed contacts in a row that drop a peer
    sync_s: float = 1.0                    # trust store re-read / TXT refresh period
    idle_poll_s: float = 2.0               # a board with no queued work (TXT work=0) is polled this often
    peer_retry_for_s: float = 3.0          # how long one call to a peer's board is retried

    @classmethod
    def load(cls, path: Path | None = None, env: dict[str, str] | None = None, **overrides: Any) -> LanSettings:
        values: dict[str, Any] = {}
        if path is not None and path.exists():
            data = yaml.safe_load(path.read_text()) or {}
            section = data.get("lan") if isinstance(data, dict) else None
            if section is not None and not isinstance(section, dict):
                raise BadRequest(f"{path}: 'lan' must be a map of settings")
            values.update(section or {})
        environ = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        for name in known:
            text = environ.get(ENV_PREFIX + name.upper())
            if text is not None:
                values[name] = text.split(",") if name == "interfaces" else yaml.safe_load(text)
        values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BadRequest(f"unknown lan setting(s): {', '.join(unknown)} (known: {', '.join(known)})")
        for name, value in values.items():
            default = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise BadRequest(f"lan setting {name}: expected true or false, got {value!r}")
            elif isinstance(default, int | float):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise BadRequest(f"lan setting {name}: expected a number, got {value!r}")
                values[name] = type(default)(value)
            elif isinstance(default, tuple):
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, list | tuple):
                    raise BadRequest(f"lan setting {name}: expected a list, got {value!r}")
                values[name] = tuple(str(v).strip() for v in items if str(v).strip())
            elif not isinstance(value, str):
                raise BadRequest(f"lan setting {name}: expected text, got {value!r}")
        settings = cls(**values)
        if settings.refresh_s >= settings.ttl_s:
            raise BadRequest(f"lan setting refresh_s ({settings.refresh_s}) must be below ttl_s ({settings.ttl_s})")
        return settings
