"""Hub (board) settings: loaded once into a frozen object. Precedence: flag > env > file > default."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from security.errors import BadRequest

__all__ = ["HubConfig"]

ENV_PREFIX = "PANAL_HUB_"


@dataclass(frozen=True)
class HubConfig:
    """Every knob of a board. Units live in the names."""

    host: str = "127.0.0.1"            # the address agents use (goes into the join URL and cert)
    bind: str = "0.0.0.0"
    port: int = 8747
    tls: bool = True                   # plain HTTP only on loopback or with insecure=true
    insecure: bool = False
    lease_ttl_s: float = 30.0          # a lease not heartbeated for this long is requeued
    max_poll_wait_s: float = 20.0      # the longest a lease request long-polls
    max_tasks_per_lease: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    max_tasks_per_job: int = 10_000
    signature_skew_s: float = 300.0    # how far a signature's created time may be from ours
    sqlite_synchronous: str = "normal"  # normal: survives kill -9; full: also survives power loss
    open_registration: bool = True     # any volunteer with the join URL may register an agent
    lan: bool = False                  # embedded in an agent (LAN mode): its trust store lists the submitters
    expiry_interval_s: float = 0.5
    retry_backoff_s: float = 1.0       # first retry delay of a failed task; doubles per attempt
    drain_timeout_s: float = 30.0
    max_blob_bytes: int = 4 * 2**30          # one uploaded file (model, dataset shard, output)
    max_blobs_total_bytes: int = 0           # all blobs together; 0: no cap
    blob_gc_grace_s: float = 24 * 3600.0     # an unreferenced blob is kept this long (a submit in flight)
    blob_gc_interval_s: float = 3600.0
    dispatch_policy: str = "priority-fifo"   # priority-fifo | fair-share | best-fit | fastest | adaptive
    #: fair-share / adaptive: submitter id -> weight (a missing submitter weighs 1.0)
    submitter_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    #: black-hole detection (hub/quarantine.py): the last ``quarantine_window`` settled attempts of an agent
    #: (0: off); once it has at least ``quarantine_min_attempts`` of them and this share failed or timed out,
    #: it gets no work for ``quarantine_base_s``, doubling on each repeat, at most ``quarantine_max_s``
    quarantine_window: int = 10
    quarantine_min_attempts: int = 5
    quarantine_failure_ratio: float = 0.8
    quarantine_base_s: float = 60.0
    quarantine_max_s: float = 3600.0

    @classmethod
    def load(cls, path: Path | None = None, env: dict[str, str] | None = None,
             **overrides: Any) -> HubConfig:
        values: dict[str, Any] = {}
        if path is not None and path.exists():
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise BadRequest(f"{path}: expected a map of settings")
            values.update(loaded)
        environ = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        for name in known:
            text = environ.get(ENV_PREFIX + name.upper())
            if text is not None:
                values[name] = yaml.safe_load(text)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BadRequest(f"unknown hub setting(s): {', '.join(unknown)} (known: {', '.join(known)})")
        for name, value in values.items():
            default = known[name].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise BadRequest(f"hub setting {name}: expected true or false, got {value!r}")
            if isinstance(default, int | float) and not isinstance(default, bool):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise BadRequest(f"hub setting {name}: expected a number, got {value!r}")
                values[name] = type(default)(value)
        if values.get("sqlite_synchronous", "normal") not in ("normal", "full"):
            raise BadRequest("hub setting sqlite_synchronous: expected normal or full")
        return cls(**values)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
