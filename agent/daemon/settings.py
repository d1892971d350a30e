"""How the daemon runs: slots, threads, polling and draining (``panal agent run`` flags fill it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DaemonSettings"]


@dataclass
class DaemonSettings:
    slots: int = 0                   # 0: the volunteer's max_concurrent_tasks preference
    threads: int = 0                 # 0: the cpu_threads preference, else cores / slots
    name: str = ""
    poll_wait_s: float = 20.0
    drain_s: float = 30.0
    insecure: bool = False
    capabilities: dict[str, Any] = field(default_factory=dict)   # overrides of the detected report
    blob_cache_bytes: int = 20 * 2**30   # inputs kept locally (LRU) so shards of one model download once
