"""The status snapshot: what ``/v1/status`` and every live viewer of the page read, built once per interval.

With 100k registered agents, listing every agent per request (2.4 MB at 10k) and rebuilding the summary per
viewer took the board down for its real agents. So the feed builds one :class:`Snapshot` per interval (and
after board events, debounced), off the request path: the summary counts, the agents in table order (ids
only: a row is materialised for the page asked for, at most ``MAX_PAGE`` of them) and the jobs in table order.
The default view (first pages) is encoded once per snapshot and served and streamed as the same bytes.

Paging: ``?agents_offset=&agents_limit=&jobs_offset=&jobs_limit=``; the reply says ``agent_page`` /
``job_page`` ``{offset, limit, total}``. Agents are listed busy (by name), then idle, quarantined and
offline ones in registration order (the bulk of a large fleet, left unsorted).

Search (server-side, over the snapshot): ``agents_q`` (part of a name or id), ``agents_state``;
``jobs_q`` (part of a name or id), ``jobs_state``, ``jobs_kind``. A search is a plain case-insensitive
substring test (no patterns: nothing a stranger types costs more than one pass), and the last ``SEARCH_CACHE``
searches of a snapshot are kept, so a page of viewers repeating one search costs one pass per snapshot. An
agent text search runs over one text of the whole fleet built at the snapshot's first one (``str.find``: a
text that matches few agents costs 0.2 ms at 10k agents instead of a 7 ms walk, one matching all of them a
comprehension over the gathered texts: benchmarks/status_search.py). So the searches a source address makes that the
cache can't answer, over a table of more than ``FREE_SEARCH_ROWS`` rows, and its pages of more than
``FREE_PAGE_ROWS`` rows are also rate-limited (hub/status_routes.py, ``status_queries_per_min``): a stranger's
stream of distinct texts or 500-row pages gets a 429, a viewer's live search (asked again once a snapshot)
does not. Every parameter is checked: an unknown
one, a bad state, or text over ``MAX_QUERY`` characters is a 400 naming it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hub.http import int_query
from hub.records import JobState
from security.errors import BadRequest

__all__ = ["AGENT_PAGE", "AGENT_STATES", "FREE_PAGE_ROWS", "FREE_SEARCH_ROWS", "JOB_PAGE", "MAX_PAGE", "MAX_QUERY",
           "Page", "Snapshot", "agent_order", "page_of"]

AGENT_PAGE = 50          # agents in the default view (the page and the live stream)
JOB_PAGE = 50            # jobs in the default view (active ones first, then the 20 recently finished)
MAX_PAGE = 500           # the most rows one request may ask for
MAX_QUERY = 64           # the longest search text
SEARCH_CACHE = 32        # searches remembered per snapshot
FREE_SEARCH_ROWS = 1000  # a search over a table this small costs no more than a request: never rate-limited
FREE_PAGE_ROWS = 100     # rows one request may have read without counting (the page's own: 50 agents, 50 jobs)
DENSE_MATCH_SHARE = 20   # a text in more than 1/20 of the agents' texts: test each text, not find each match
AGENT_STATES = ("busy", "idle", "offline", "quarantined")
JOB_STATES = tuple(s.value for s in JobState)
_NUMBERS = ("agents_offset", "agents_limit", "jobs_offset", "jobs_limit")
_TEXTS = ("agents_q", "agents_state", "jobs_q", "jobs_state", "jobs_kind")


@dataclass(frozen=True)
class Page:
    """Which rows of the agent and job tables a request asks for."""

    agents_offset: int = 0
    agents_limit: int = AGENT_PAGE
    jobs_offset: int = 0
    jobs_limit: int = JOB_PAGE
    agents_q: str = ""
    agents_state: str = ""
    jobs_q: str = ""
    jobs_state: str = ""
    jobs_kind: str = ""

    @property
    def is_default(self) -> bool:
        return self == Page()

    @property
    def agent_search(self) -> tuple[str, str]:
        return self.agents_q, self.agents_state

    @property
    def job_search(self) -> tuple[str, str, str]:
        return self.jobs_q, self.jobs_state, self.jobs_kind

    @classmethod
    def from_query(cls, request: web.Request) -> Page:
        """The page a request names (missing parameters: the default view); limits are capped at MAX_PAGE.
        Anything else is a 400 that names the parameter."""
        unknown = sorted(set(request.query) - set(_NUMBERS) - set(_TEXTS))
        if unknown:
            raise BadRequest(f"query parameter {unknown[0][:MAX_QUERY]!r} is not known here; known: "
                             + ", ".join(_NUMBERS + _TEXTS), code="bad_query")
        texts = {name: _text(request, name) for name in _TEXTS}
        for name, allowed in (("agents_state", AGENT_STATES), ("jobs_state", JOB_STATES)):
            if texts[name] and texts[name] not in allowed:
                raise BadRequest(f"query parameter {name}: expected one of {', '.join(allowed)}, "
                                 f"got {texts[name]!r}", code="bad_query")
        return cls(int_query(request, "agents_offset", 0),
                   min(int_query(request, "agents_limit", AGENT_PAGE), MAX_PAGE),
                   int_query(request, "jobs_offset", 0), min(int_query(request, "jobs_limit", JOB_PAGE), MAX_PAGE),
                   **texts)


def _text(request: web.Request, name: str) -> str:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"query parameter {name}: given {len(values)} times, expected once", code="bad_query")
    text = values[0].strip() if values else ""
    if len(text) > MAX_QUERY:
        raise BadRequest(f"query parameter {name}: at most {MAX_QUERY} characters, got {len(text)}",
                         code="bad_query")
    if any(not ch.isprintable() for ch in text):
        raise BadRequest(f"query parameter {name}: control characters are not allowed", code="bad_query")
    return text.lower()


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
    agent_states: dict[str, str] = field(default_factory=dict)          # id -> state, at the build
    agent_text: Callable[[str], str] = lambda _agent_id: ""             # id -> lowercase "name id" (searched)
    job_index: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id -> ("name id", state, kind)
    searches: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # recent searches' results

    _texts: list[str] = field(default_factory=list, init=False, repr=False)   # agent_text of each, table order
    _haystack: str = field(default="", init=False, repr=False)   # the same, one line each
    _line_starts: list[int] = field(default_factory=list, init=False, repr=False)   # where each agent's line starts

    def agents_matching(self, q: str, state: str) -> list[str]:
        """Agent ids in table order whose name or id contains ``q`` and whose state is ``state`` (if given)."""
        if not q and not state:
            return self.agent_ids
        if not q:
            return self._cached(("a", q, state), lambda: [
                i for i in self.agent_ids if self.agent_states.get(i) == state])
        return self._cached(("a", q, state), lambda: [
            i for i in self._agents_containing(q) if not state or self.agent_states.get(i) == state])

    def _agents_containing(self, q: str) -> list[str]:
        """Agents whose text contains ``q``, over their texts gathered at this snapshot's first text search (one
        lookup per agent, once): a text found in few of them costs a ``str.find`` in C per match over one text of
        the whole fleet, one found in many a comprehension with no call per agent (``str.count`` tells which)."""
        if len(self._texts) != len(self.agent_ids):
            self._texts = [self.agent_text(i) for i in self.agent_ids]   # lowercase
            self._haystack = "\n".join(self._texts) + "\n"
            starts, at = [], 0
            for text in self._texts:
                starts.append(at)
                at += len(text) + 1
            self._line_starts = starts
        hay, starts = self._haystack, self._line_starts
        if hay.count(q) > len(starts) // DENSE_MATCH_SHARE:
            return [i for i, text in zip(self.agent_ids, self._texts, strict=True) if q in text]
        # q has no line break (control characters are refused), so no match spans two agents' texts (a line
        # break inside a name is harmless: rows are found by offset, not by splitting)
        found, at = [], hay.find(q)
        while at >= 0:
            row = bisect.bisect_right(starts, at) - 1
            found.append(self.agent_ids[row])
            at = hay.find(q, starts[row + 1]) if row + 1 < len(starts) else -1
        return found

    def jobs_matching(self, q: str, state: str, kind: str) -> list[str]:
        """Job ids in table order matching name/id text, state and kind (each if given)."""
        if not q and not state and not kind:
            return self.job_ids
        return self._cached(("j", q, state, kind), lambda: [
            i for i in self.job_ids if (entry := self.job_index.get(i)) is not None
            and (not state or entry[1] == state) and (not kind or entry[2] == kind) and q in entry[0]])

    def costly(self, page: Page) -> int:
        """What ``page`` costs beyond an ordinary request, in the units a per-address limit counts
        (hub/status_routes.py): one per pass it would make over a table of more than ``FREE_SEARCH_ROWS`` rows
        (a repeated search, or another page of one, is served from this snapshot's cache), and one if it asks
        for more than ``FREE_PAGE_ROWS`` rows (each is read live: 500 agent rows take ~8 ms at 10k agents)."""
        agents_q, agents_state = page.agent_search
        jobs_q, jobs_state, jobs_kind = page.job_search
        asked: list[tuple[tuple[str, ...], int]] = []
        if agents_q or agents_state:
            asked.append((("a", agents_q, agents_state), len(self.agent_ids)))
        if jobs_q or jobs_state or jobs_kind:
            asked.append((("j", jobs_q, jobs_state, jobs_kind), len(self.job_ids)))
        passes = sum(key not in self.searches and rows > FREE_SEARCH_ROWS for key, rows in asked)
        rows = min(page.agents_limit, len(self.agent_ids)) + min(page.jobs_limit, len(self.job_ids))
        return passes + (rows > FREE_PAGE_ROWS)

    def _cached(self, key: tuple[str, ...], compute: Callable[[], list[str]]) -> list[str]:
        found = self.searches.get(key)
        if found is None:
            if len(self.searches) >= SEARCH_CACHE:
                del self.searches[next(iter(self.searches))]
            found = self.searches[key] = compute()
        return found


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
