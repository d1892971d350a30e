"""Rows of the public status page: an agent's state and row, a job's public summary and row (what a stranger
may see). Rows are read live from the board when a page of a table is asked for, so they are functions of the
board's view, apart from the feed that decides which rows a page holds (hub/status_page.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hub.fleet import AgentState
from hub.readmodel import BoardView, job_summary
from hub.records import JobRow, TaskState

__all__ = ["active_job_row", "agent_row", "agent_state", "public_job"]


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


def agent_row(view: BoardView, agent: AgentState, online: bool, standing: dict[str, Any]) -> dict[str, Any]:
    """An agent's row of the agent table: its devices, running tasks, counts and ``standing`` (credit, invalid
    results, a speed flag: hub/trust/)."""
    caps = agent.caps
    found = caps.raw.get("cpu")
    cpu: dict[str, Any] = found if isinstance(found, dict) else {}
    running = []
    for task_id in sorted(agent.running):
        task = view.task(task_id)
        job = view.job(task.job_id) if task is not None else None
        if task is not None and job is not None:
            running.append({"task": task_id, "job": job.id, "job_name": job.name, "idx": task.idx,
                            "progress": task.progress})
    settled = agent.done + agent.failed
    return {
        "id": agent.row.id, "name": agent.row.name, "state": agent_state(agent, online),
        "gpus": [{"name": g.name, "backend": g.backend, "vram_gb": g.vram_gb, "gflops_fp32": g.gflops_fp32}
                 for g in caps.gpus],
        "cpu": {"model": str(cpu.get("model") or ""), "cores": caps.cpu_cores, "gflops_fp32": caps.cpu_gflops},
        "memory_gb": caps.memory_gb, "running": running, "done": agent.done, "failed": agent.failed,
        "error_rate": round(agent.failed / settled, 4) if settled else 0.0,
        "credit": round(float(standing.get("credit", 0.0)), 3),
        "invalid_results": int(standing.get("invalid_results", 0)),
        "speed_flag": standing.get("speed_flag"),
        "last_seen": agent.last_seen, "registered_at": agent.row.registered_at, "quarantine": agent.refused,
    }


def active_job_row(view: BoardView, job: JobRow, now: float,
                   waiting_lines: Callable[[str], list[str]]) -> dict[str, Any]:
    """An active job's row of the job table: its public summary, quorum, an ETA from its pace so far, and why
    its queued tasks wait (``waiting_lines``: hub/status_waiting.py)."""
    counts = view.counts(job.id)
    row = public_job(job_summary(job, counts))
    row["quorum"] = int(job.validation.get("quorum", 1))
    settled = sum(counts.get(s.value, 0) for s in TaskState if s.terminal)
    row["eta_s"] = (now - job.created_at) / settled * (job.n_tasks - settled) if settled else None
    if view.queued(job.id) and (lines := waiting_lines(job.id)):
        row["waiting_because"] = lines
    return row
