"""``untrusted``: a test-only stand-in for submitter code: runs ``params.source`` (Python) as is.

Registered only when ``PANAL_TEST_KINDS=1``. It is ``sandboxed``, so it runs only in the OS sandbox,
which is what the hostile-code tests (tests/test_sandbox_hostile.py) drive with code that tries to
read the agent's key, reach the hub, fork-bomb, and so on. The code sees ``ctx`` and ``params`` and
may set ``result`` (a map of values) and ``files`` (name -> path of an output file).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from jobs.kinds.base import Kind, KindOutput, Param, RunContext


class Untrusted(Kind):
    name = "untrusted"
    summary = "test-only: run the given Python source as submitter code (sandboxed)"
    test_only = True
    sandboxed: ClassVar[bool] = True
    params = {"source": Param(str, doc="Python source to run"), "arg": Param(int, 0)}

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        scope: dict[str, Any] = {"ctx": ctx, "params": dict(params), "result": {}, "files": {}}
        exec(compile(params["source"], "<submitted code>", "exec"), scope)  # noqa: S102 -- the point of the kind
        return KindOutput(values=dict(scope["result"]), files={k: Path(v) for k, v in scope["files"].items()})
