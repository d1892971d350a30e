"""Telling a sandbox refusal from an ordinary bug in submitter code, with the attempted action named.

Inside the sandbox the host's files are simply not there (``ENOENT``), the system is read-only
(``EROFS``/``EACCES``/``EPERM``), the network has nothing to reach (``ECONNREFUSED``, no DNS), and
``fork`` fails with ``EAGAIN`` at the process limit. Code that hits one of these tried to leave its
sandbox, and the submitter should read that, not a bare traceback: ``sandbox_violation: read of
/root/.local/share/panal/agent.key refused: not visible in the sandbox``. A missing file *inside*
the work dir or inputs is the code's own bug and stays an ordinary ``error`` (a missing file in its
private ``/tmp`` counts as a violation: the host's ``/tmp`` is one of the places it may not see).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

__all__ = ["sandbox_violation"]

_FS_ERRNOS = {errno.ENOENT: "not visible in the sandbox", errno.EACCES: "permission denied in the sandbox",
              errno.EPERM: "not permitted in the sandbox", errno.EROFS: "read-only in the sandbox"}
_NET_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or during (code often wraps an OSError)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out and len(out) < 16:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _inside(path: Path, ctx: Any) -> bool:
    roots = [Path(ctx.workdir), *(Path(p).parent for p in ctx.inputs.values())]
    try:
        resolved = path if path.is_absolute() else Path(ctx.workdir) / path
    except (TypeError, ValueError):
        return False
    return any(resolved == r or resolved.is_relative_to(r) for r in roots)


def sandbox_violation(exc: BaseException, ctx: Any) -> str | None:
    """What the code tried that the sandbox refused, or None when the failure is an ordinary one."""
    for err in _chain(exc):
        if isinstance(err, socket.gaierror):
            return f"network access refused: the sandbox has no network (name lookup failed: {err})"
        if isinstance(err, BlockingIOError) and err.errno == errno.EAGAIN and err.filename is None:
            return "process limit reached: the sandbox allows a bounded number of processes (fork refused)"
        if not isinstance(err, OSError):
            continue
        if err.errno == errno.EFBIG:
            return "disk limit: a file grew past the sandbox's size limit (write refused)"
        if err.errno == errno.ENOSPC:
            return "disk limit: no space left where the task wrote (its /tmp and /dev/shm are small tmpfs)"
        if err.errno in _NET_ERRNOS:
            return f"network access refused: the sandbox has no network ({err.strerror})"
        if err.errno in _FS_ERRNOS and err.filename is not None:
            target = Path(str(err.filename))
            if err.errno == errno.ENOENT and _inside(target, ctx):
                continue   # a missing file of its own: the code's bug, not the sandbox
            action = "access"
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                action = "write or access"
            return f"{action} of {target} refused: {_FS_ERRNOS[err.errno]} (only its work dir, inputs and /tmp are)"
        if isinstance(err, PermissionError):
            return f"operation refused by the sandbox: {err.strerror or err}"
    return None
