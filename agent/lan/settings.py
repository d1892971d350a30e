"""LAN mode's settings: the ``lan:`` section of ``HOME/agent.yaml``, env ``PANAL_LAN_<NAME>``, flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.settings import load_settings
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
        settings = load_settings(cls, what="lan", env_prefix=ENV_PREFIX, path=path, section="lan", env=env,
                                 overrides=overrides)
        if settings.refresh_s >= settings.ttl_s:
            raise BadRequest(f"lan setting refresh_s ({settings.refresh_s}) must be below ttl_s ({settings.ttl_s})")
        return settings
