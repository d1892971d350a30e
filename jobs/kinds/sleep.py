"""``sleep``: waits; the kind that exercises leases, heartbeats and dispatch overhead."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext


class Sleep(Kind):
    name = "sleep"
    summary = "sleep for some seconds (tests of leases, timing and dispatch overhead)"
    params = {"seconds": Param(float, 0.0, minimum=0.0, maximum=86_400.0)}

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        return Cost(seconds=float(params["seconds"]))

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        total = float(params["seconds"])
        deadline = time.monotonic() + total
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.25))
            ctx.progress(1.0 - max(left - 0.25, 0.0) / total)
        return KindOutput(values={"slept": total})
