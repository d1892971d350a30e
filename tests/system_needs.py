"""Tests that drive a real system part (Chromium, Avahi, network namespaces) ask for it here.

Where the part is missing they skip with one clear reason, and the run ends with a line naming what
was skipped and the command that enables it. Under ``CI`` they fail instead: CI must run them all.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["ENABLE", "PREFIX", "pytest_terminal_summary", "require_system"]

#: Every skip reason from here starts with this, so the summary can find them among other skips.
PREFIX = "system part missing:"
#: The one command that installs what these tests need (also run by `make test` and `.ci/run`).
ENABLE = "sudo bash .ci/system-deps && make test"


def require_system(missing: str | None) -> None:
    """Skip (or, under CI, fail) the calling test when ``missing`` names an absent system part."""
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing} (CI must run this test: .ci/run installs it)")
    pytest.skip(f"{PREFIX} {missing}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One closing line: how many tests skipped for a missing system part, which parts, and the fix."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if PREFIX in message:
            part = message.split(PREFIX, 1)[1].strip()
            reasons[part] = reasons.get(part, 0) + 1
    if not reasons:
        return
    count = sum(reasons.values())
    terminalreporter.write_sep("=", "tests skipped for missing system parts", yellow=True)
    for part, n in sorted(reasons.items()):
        terminalreporter.write_line(f"  {n} x {part}")
    terminalreporter.write_line(f"{count} tests skipped: {', '.join(sorted(reasons))}; enable them with: {ENABLE}")
