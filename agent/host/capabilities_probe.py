"""Capability detection from the daemon, in a child process.

Detection imports torch and runs a short self-test on every device; the daemon stays light (and
safe from a crashing driver) by running ``python -m agent.host.capabilities`` and reading its JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from agent.host.capabilities import basic, deep_merge
from agent.host.home import AgentHome

__all__ = ["detect_capabilities"]

log = logging.getLogger(__name__)


async def detect_capabilities(home: AgentHome, overrides: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    """The measured report (cached in the agent's home), with ``overrides`` merged in.

    Falls back to the torch-free basic report if the probe fails, saying why in the log."""
    home.ensure()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.host.capabilities", "--cache", str(home.root / "capabilities-cache.json"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("capability probe timed out after %.0f s; advertising the basic report", timeout_s)
        return basic(overrides)
    if proc.returncode != 0:
        log.warning("capability probe failed (%s); advertising the basic report", err.decode()[-500:].strip())
        return basic(overrides)
    try:
        caps = json.loads(out)
    except ValueError:
        log.warning("capability probe printed no JSON; advertising the basic report")
        return basic(overrides)
    return deep_merge(caps, overrides)
