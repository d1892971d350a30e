"""The status snapshot: what ``/v1/status`` and every live viewer of the page read, built once per interval.

With 100k registered agents, listing every agent per request (2.4 MB at 10k) and rebuilding the summary per
viewer took the board down for its real agents. So the feed builds one :class:`Snapshot` per interval (and
after board events, debounced), off the request path: the summary counts, the agents in table order (ids
only: a row is materialised for the page asked for, at most ``MAX_PAGE`` of them) and the jobs in table order.
The default view (first pages) is encoded once per snapshot and served and streamed as the same bytes.

Paging: ``?agents_offset=&agents_limit=&jobs_offset=&jobs_limit=``; the reply says ``agent_page`` /
``job_page`` ``{offset, limit, total}``. Agents are listed busy (by name), then idle, quarantined and
offline ones in registration order (the bulk of a large fleet, left unsorted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hub.http import int_query

__all__ = ["AGENT_PAGE", "JOB_PAGE", "MAX_PAGE", "Page", "Snapshot", "agent_order", "page_of"]

AGENT_PAGE = 50          # agents in the default view (the page and the live stream)
JOB_PAGE = 120           # jobs in the default view: up to 100 active and the 20 recently finished
MAX_PAGE = 500           # the most rows one request may ask for


@dataclass(frozen=True)
class Page:
    """Which rows of the agent and job tables a request asks for."""

    agents_offset: int = 0
    agents_limit: int = AGENT_PAGE
    jobs_offset: int = 0
    jobs_limit: int = JOB_PAGE

    @property
    def is_default(self) -> bool:
        return self == Page()

    @classmethod
    def from_query(cls, request: web.Request) -> Page:
        """The page a request names (missing parameters: the default view); limits are capped at MAX_PAGE."""
        return cls(int_query(request, "agents_offset", 0),
                   min(int_query(request, "agents_limit", AGENT_PAGE), MAX_PAGE),
                   int_query(request, "jobs_offset", 0), min(int_query(request, "jobs_limit", JOB_PAGE), MAX_PAGE))


@dataclass
class Snapshot:
    """One build of the status: ``base`` is every field but the two tables."""

    base: dict[str, Any]
    agent_ids: list[str]              # every registered agent, in table order
    job_ids: list[str]                # active jobs (priority order), then recently finished ones
    fingerprint: tuple[Any, ...]      # what the board looked like (counters): a change makes it stale
    built_at: float                   # loop time of the build
    build_s: float = 0.0              # how long the build took (throttles the next one)
    body: dict[str, Any] = field(default_factory=dict)   # the default view, tables included
    json: bytes = b""                 # ``body`` as JSON: served as is to /v1/status
    frame: bytes = b""                # ``body`` as an SSE ``status`` frame: sent to every viewer


def agent_order(states: Mapping[str, str], busy: list[tuple[str, str]]) -> list[str]:
    """Agent ids in table order: busy ones by name (``busy``: (name, id) pairs), then idle, quarantined and
    offline ones, each in registration order (``states``: id -> state, in registration order). Only the few
    busy agents are sorted: a sort of the whole fleet would hold the event loop for 100k agents."""
    groups: dict[str, list[str]] = {"idle": [], "quarantined": [], "offline": []}
    for agent_id, state in states.items():
        if state != "busy":
            groups[state].append(agent_id)
    return [i for _, i in sorted(busy)] + groups["idle"] + groups["quarantined"] + groups["offline"]


def page_of(ids: list[str], offset: int, limit: int) -> tuple[list[str], dict[str, int]]:
    """The ids on one page and the page's description for the reply."""
    return ids[offset:offset + limit], {"offset": offset, "limit": limit, "total": len(ids)}
