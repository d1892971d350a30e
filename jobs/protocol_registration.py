"""An agent's registration on the wire: its key, name and capability report, and the board's answer.

Why its own module: registration is the one exchange before an agent has an id, so it carries what the board
stores about the agent (bounded here: a name shown on the status page, a report kept per agent and re-sent with
every re-registration) and the board's pacing the agent then follows. Leases are in :mod:`jobs.protocol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jobs.fields import Fields, field_error
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK, encode_body
from security.errors import BadRequest
from security.identity import PublicKey

__all__ = ["MAX_AGENT_NAME", "MAX_CAPABILITIES_BYTES", "Registered", "Registration"]

#: bounds on what a registration stores (a name is shown on the status page; the report is kept per agent)
MAX_AGENT_NAME = 128
MAX_CAPABILITIES_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Registration:
    """An agent's key (the request is signed with it), its name and its capability report."""

    public_key: PublicKey
    name: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)

    def encode(self) -> dict[str, Any]:
        return {"public_key": self.public_key.text(), "name": self.name,
                "capabilities": dict(self.capabilities.raw)}

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Registration:
        f = Fields(value, path)
        key_text = f.text("public_key")
        try:
            key = PublicKey.parse(key_text)
        except BadRequest as exc:
            raise field_error(f.at("public_key"), exc.message) from exc
        report = f.mapping("capabilities")
        if len(encode_body(report, MSGPACK)) > MAX_CAPABILITIES_BYTES:   # stored, re-sent with every re-registration
            raise BadRequest(f"{f.at('capabilities')}: a capability report is at most {MAX_CAPABILITIES_BYTES} bytes",
                             code="bad_capabilities", details={"field": f.at("capabilities")})
        slots = report.get("slots")
        if isinstance(slots, float) and not math.isfinite(slots):   # JSON's Infinity, NaN, 1e400
            raise BadRequest(f"{f.at('capabilities')}: slots: expected a finite number, got {slots}",
                             code="bad_capabilities", details={"field": f.at("capabilities")})
        try:
            caps = Capabilities.from_dict(report)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:   # int(inf): cores, a GPU's index
            raise BadRequest(f"{f.at('capabilities')}: malformed capability report: {exc}",
                             code="bad_capabilities", details={"field": f.at("capabilities")}) from exc
        name = f.optional_text("name") or ""
        if len(name) > MAX_AGENT_NAME:
            raise field_error(f.at("name"), f"an agent name is at most {MAX_AGENT_NAME} characters")
        return cls(key, name, caps)


@dataclass(frozen=True, slots=True)
class Registered:
    """The board's answer to a registration: the agent's id and the board's pacing, and the agent's
    standing (as in :class:`jobs.protocol.LeaseReply`), so an agent that starts paused still knows its credit."""

    agent_id: str
    lease_ttl_s: float = 30.0
    max_poll_wait_s: float = 20.0
    max_tasks_per_lease: int = 64
    standing: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agent_id": self.agent_id, "lease_ttl_s": self.lease_ttl_s,
                               "max_poll_wait_s": self.max_poll_wait_s, "max_tasks_per_lease": self.max_tasks_per_lease}
        if self.standing:   # absent when empty, as in LeaseReply
            out["standing"] = self.standing
        return out

    @classmethod
    def decode(cls, value: Any, path: str = "") -> Registered:
        f = Fields(value, path)
        return cls(f.text("agent_id"), f.number("lease_ttl_s", 30.0), f.number("max_poll_wait_s", 20.0),
                   f.integer("max_tasks_per_lease", 64), f.mapping("standing"))
