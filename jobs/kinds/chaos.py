"""``chaos``: a test-only kind that fails on purpose (crash, OOM, hang, errors).

Registered only when ``PANAL_TEST_KINDS=1`` so no real board ever offers it.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Mapping
from typing import Any

from jobs.errors import PermanentError, RetryableError
from jobs.kinds.base import Kind, KindOutput, Param, RunContext

MODES = ("ok", "abort", "oom", "shared_hog", "hang", "transient", "permanent")


class Chaos(Kind):
    name = "chaos"
    summary = "test-only: misbehave on purpose"
    test_only = True
    params = {"mode": Param(str, "ok", choices=MODES), "seconds": Param(float, 0.0, minimum=0.0),
              "mb": Param(int, 0, minimum=0, maximum=1 << 16, doc="shared_hog: MB to touch")}

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        mode = params["mode"]
        time.sleep(params["seconds"])
        if mode == "abort":
            os.abort()
        if mode == "oom":
            hog = []
            while True:  # allocate until the memory cap stops us
                hog.append(bytearray(64 * 1024 * 1024))
        if mode == "shared_hog":   # shared anonymous memory: RLIMIT_DATA does not count it, RSS does
            maps = []
            for _ in range(params["mb"] // 32):
                chunk = mmap.mmap(-1, 32 * 2**20)
                chunk.write(b"\x01" * (32 * 2**20))
                maps.append(chunk)
                time.sleep(0.01)
            return KindOutput(values={"mode": mode, "mb": 32 * len(maps)})
        if mode == "hang":
            while True:
                time.sleep(1)
        if mode == "transient":
            raise RetryableError("chaos: transient failure")
        if mode == "permanent":
            raise PermanentError("chaos: permanent failure")
        # What the worker gave the task (tests of spec.resources.threads and the OpenMP wait policy).
        return KindOutput(values={"mode": mode, "threads": ctx.threads,
                                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
