"""How a job kind says whether a failure is worth retrying elsewhere.

A kind raises :class:`RetryableError` for transient trouble (device lost, a flaky driver) and
:class:`PermanentError` for work that can never succeed (bad parameters, unsupported input).
The runner maps everything else: timeouts, OOM and crashes are transient; parameter errors are not.
"""

from __future__ import annotations

from enum import StrEnum

from security.errors import BadRequest

__all__ = ["FailureClass", "InvalidParams", "PermanentError", "RetryableError"]


class FailureClass(StrEnum):
    TIMEOUT = "timeout"
    OOM = "oom"
    CRASHED = "crashed"
    DEVICE_LOST = "device_lost"
    AGENT_LOST = "agent_lost"
    INVALID_PARAMS = "invalid_params"
    UNSUPPORTED = "unsupported"
    ERROR = "error"
    #: submitter code tried what its sandbox forbids (a file outside its work dir and inputs, the
    #: network, more processes than allowed): the same code would do it on any agent, so not retried
    SANDBOX_VIOLATION = "sandbox_violation"

    @property
    def transient(self) -> bool:
        return self not in (FailureClass.INVALID_PARAMS, FailureClass.UNSUPPORTED, FailureClass.SANDBOX_VIOLATION)


class RetryableError(Exception):
    """Transient failure: retry this task, preferably elsewhere."""

    failure = FailureClass.ERROR


class PermanentError(Exception):
    """This task can never succeed; fail it at once with this message."""

    failure = FailureClass.UNSUPPORTED


class InvalidParams(BadRequest):
    """Parameters of a kind are wrong; ``errors`` lists (field path, message) pairs."""

    code = "invalid_params"

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in errors),
                         details=[{"path": p, "message": m} for p, m in errors])
