"""Rows of the public status page: an agent's state and a job's public summary (what a stranger may see)."""

from __future__ import annotations

from typing import Any

from hub.fleet import AgentState

__all__ = ["agent_state", "public_job"]


def agent_state(agent: AgentState, online: bool) -> str:
    """One of quarantined, offline, busy, idle (a partition of the registered agents)."""
    if agent.refused:
        return "quarantined"
    if not online:
        return "offline"
    return "busy" if agent.running else "idle"


def public_job(view: dict[str, Any]) -> dict[str, Any]:
    """A job summary without free text that may quote parameters (error), private metadata (labels), or the
    best task's parameters (its index, metric and value are shown: the submitter chose to name a metric)."""
    out = {k: v for k, v in view.items() if k not in ("error", "labels")}
    best = view.get("best")
    if best:
        out["best"] = {k: best.get(k) for k in ("unit", "metric", "mode", "value")}
    done = view["tasks"].get("done", 0)
    out["progress"] = done / view["n_tasks"] if view["n_tasks"] else 1.0
    return out
