"""Signed clients of a test's in-process board: a registered agent and an enrolled submitter."""

from __future__ import annotations

from typing import Any

from conftest import InProcessHub

from agent.client.board import BoardClient
from security.identity import Identity

__all__ = ["agent", "submitter"]


async def agent(hub: InProcessHub, name: str, caps: dict[str, Any]) -> tuple[BoardClient, Identity]:
    """A new key registered as an agent called ``name`` with the capability report ``caps``."""
    assert hub.address is not None
    ident = Identity.generate()
    client = BoardClient(hub.address, ident, retry_for_s=1)
    await client.call("POST", "/v1/agents", {"public_key": ident.public.text(), "name": name, "capabilities": caps})
    return client, ident


async def submitter(hub: InProcessHub) -> BoardClient:
    """A client of a new key that the board knows as a submitter."""
    assert hub.address is not None and hub.server is not None
    user = Identity.generate()
    await hub.server.add_submitter(user.public, "user")
    return BoardClient(hub.address, user, retry_for_s=1)
