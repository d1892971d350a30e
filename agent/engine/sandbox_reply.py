"""What of a sandboxed task's reply the agent believes: the failure classes its code may claim, and a size
bound on what goes into the signed result.

Submitter code inside the sandbox writes its own reply frame (:mod:`agent.engine.worker`'s protocol), so the
reply is a stranger's word, checked here before the agent signs anything of it: a failure class that blames
the agent or its device would have the task retried elsewhere and count against honest agents, and a reply
too big for the board's body limit would be refused together with every result batched with it, for ever.
Split from :mod:`agent.engine.sandboxed` (the sandbox's life cycle and files), which applies both.
"""

from __future__ import annotations

import msgpack

from agent.engine.runner import Outcome
from jobs.errors import FailureClass

__all__ = ["CLAIMABLE", "ERROR_CHARS", "REPLY_BYTES", "bounded", "claimed"]

#: what of a sandboxed task's reply goes into its signed result (values, metrics, notes, error): the
#: code can forge the reply frame past the python kind's own 1 MiB check, and a result over the
#: board's body limit (4 MiB by default) would be refused with every result batched with it, for ever
REPLY_BYTES = 1 * 2**20 + 64 * 2**10
#: a failure's message (the code may forge one of any length)
ERROR_CHARS = 4000
#: the failure classes submitter code may report for itself: what its own code can cause (not the
#: agent's or its device's trouble, which would retry it elsewhere and count against honest agents)
CLAIMABLE = frozenset(c.value for c in (FailureClass.SANDBOX_VIOLATION, FailureClass.OOM, FailureClass.TIMEOUT,
                                        FailureClass.CRASHED, FailureClass.INVALID_PARAMS, FailureClass.UNSUPPORTED,
                                        FailureClass.ERROR))


def claimed(outcome: Outcome) -> Outcome:
    """The outcome if its failure class is one the code may claim; any other is reported as ``crashed``
    (``device_lost`` or ``agent_lost`` claimed by the code would blame the agent)."""
    if outcome.ok or outcome.error_class in CLAIMABLE:
        return outcome
    name = str(outcome.error_class)[:40]
    return Outcome.failed(FailureClass.CRASHED, f"the task's code reported failure class {name!r}, which "
                          f"sandboxed code may not claim ({outcome.error or 'no message'})", outcome.started_at)


def bounded(outcome: Outcome) -> Outcome:
    """The outcome, if what it would put in the signed result is within ``REPLY_BYTES``; else a
    violation naming its size. A failure's message is cut to ``ERROR_CHARS``."""
    if outcome.error is not None and len(outcome.error) > ERROR_CHARS:
        outcome.error = outcome.error[:ERROR_CHARS] + " [cut]"
    try:
        size = len(msgpack.packb([outcome.values, outcome.metrics, outcome.notes, outcome.error_class,
                                  outcome.error], use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        return Outcome.failed(FailureClass.SANDBOX_VIOLATION, f"the task's reply is not plain data ({exc})",
                              outcome.started_at)
    if size > REPLY_BYTES:
        return Outcome.failed(FailureClass.SANDBOX_VIOLATION, f"the task's reply (values, metrics, notes) is "
                              f"{size / 2**20:.1f} MiB; at most {REPLY_BYTES // 2**10} KiB goes back to the "
                              f"submitter: write large results with ctx.output", outcome.started_at)
    return outcome
