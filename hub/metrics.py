"""Prometheus metrics of one board at ``GET /metrics``, in a registry of its own (several boards share a process).

Gauges and counters are read from the board's read model at scrape time (agents and tasks by state,
its ``stats`` counters, quarantines seen by the status feed); request latency is timed by a middleware, labelled by
route template (never by raw path: ids would explode the series); dispatch latency is the time the
dispatch policy takes to pick tasks for one lease request; lease wake-ups count waiting lease requests woken.
A lease request's service time is its time in the handler less its waits for the client's body and in long-polls
(``hub/waits.py``): what the hub takes to serve it (signature, results committed, the pick, the reply encoded,
and waiting for its one event loop behind other requests), which the request latency of a long-poll hides.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from hub import waits
from hub.board import Board
from hub.http import Handler
from hub.readmodel import BoardView
from hub.records import TaskState
from hub.status_page import FEED_KEY, agent_state
from hub.trust.trust import Trust

__all__ = ["METRICS_KEY", "BoardMetrics", "add_metrics"]

#: routes whose requests are open streams: counted, but kept out of the latency histogram
STREAMING_ROUTES = frozenset({"/v1/events"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: fine below 100 ms: a bench reads lease service p50/p99 from these buckets (interpolated within one)
SERVICE_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
                   0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LEASE_ROUTE = "/v1/lease"
DISPATCH_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
#: BoardView.stats key -> (counter name without _total, help)
STAT_COUNTERS = {
    "leases": ("panal_leases", "Tasks handed out to agents in leases."),
    "expired": ("panal_lease_expired", "Leases that expired (agent stopped heartbeating); the task was requeued."),
    "retries": ("panal_task_retries", "Failed or expired attempts requeued for another try."),
    "envelopes_sent": ("panal_lease_envelopes", "Assignments sent with their job's signed manifest envelope."),
    "envelopes_omitted": ("panal_lease_envelopes_omitted", "Assignments sent without their job's envelope: the "
                          "agent held it already (LeaseRequest.have) or the reply carried it once before."),
    "envelopes_to_fetch": ("panal_lease_envelopes_to_fetch", "Assignments sent without their job's envelope because "
                           "it is too big to inline: the agent fetches it once (GET /v1/jobs/{id}/envelope)."),
    "envelopes_fetched": ("panal_envelopes_fetched", "Job envelopes fetched by their lessees."),
}
RESULT_STATS = {"results_accepted": "accepted", "results_failed": "failed", "results_duplicate": "duplicate",
                "results_rejected": "rejected"}


class _BoardCollector:
    """Reads the board's read model at scrape time."""

    def __init__(self, view: BoardView, app: web.Application, trust: Trust | None = None) -> None:
        self.view, self.app, self.trust = view, app, trust

    def collect(self) -> Iterable[Metric]:
        view = self.view
        online = {a.row.id for a in view.online_agents()}
        states = Tally(agent_state(a, a.row.id in online) for a in view.agents.values())
        agents = GaugeMetricFamily("panal_agents", "Registered agents by state (a partition).", labels=["state"])
        for state in ("idle", "busy", "offline", "quarantined"):
            agents.add_metric([state], states[state])
        yield agents
        yield GaugeMetricFamily("panal_agents_online", "Agents seen within the online horizon.", value=len(online))
        tasks = GaugeMetricFamily("panal_tasks", "Tasks of active jobs by state.", labels=["state"])
        totals = view.task_totals()
        for task_state in TaskState:
            tasks.add_metric([task_state.value], totals[task_state])
        yield tasks
        yield GaugeMetricFamily("panal_jobs_active", "Jobs not yet finished.", value=view.active_count())
        for key, (name, text) in STAT_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=view.stats.get(key, 0))
        results = CounterMetricFamily("panal_results", "Results received, by outcome.", labels=["outcome"])
        for key, outcome in RESULT_STATS.items():
            results.add_metric([outcome], view.stats.get(key, 0))
        yield results
        if self.trust is not None:
            yield from self._trust(self.trust)
        feed = self.app.get(FEED_KEY)
        if feed is not None:
            feed.observe()
            yield CounterMetricFamily("panal_quarantines", "Times an agent entered quarantine.",
                                      value=feed.quarantines)


    def _trust(self, trust: Trust) -> Iterable[Metric]:
        """Result validation (hub/trust/): units settled and instances run by outcome; credit per agent."""
        units = CounterMetricFamily("panal_validation", "Result validation events since start, by outcome.",
                                    labels=["outcome"])
        for outcome, n in sorted(trust.stats.items()):
            units.add_metric([outcome], n)
        yield units
        credit = GaugeMetricFamily("panal_agent_credit", "Credit for validated work (1 = 1 GFLOP of estimated "
                                   "work), per agent.", labels=["agent"])
        invalid = GaugeMetricFamily("panal_agent_invalid_results", "Results outvoted by other agents, per agent.",
                                    labels=["agent"])
        for agent_id in self.view.agents:
            standing = trust.agent_view(agent_id)
            credit.add_metric([agent_id], standing["credit"])
            invalid.add_metric([agent_id], standing["invalid_results"])
        yield credit
        yield invalid


class _WakeupCollector:
    """Lease long-polls woken by new work: divided by tasks dispatched, what a submission costs the fleet."""

    def __init__(self, board: Board) -> None:
        self.board = board

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("panal_lease_wakeups", "Waiting lease requests woken because work may have "
                                  "appeared.", value=self.board.lease_wakeups)


class BoardMetrics:
    """The registry and the instruments the middleware and the dispatch timer feed."""

    def __init__(self, board: Board, app: web.Application) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("panal_http_request_duration_seconds", "HTTP request latency by route.",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("panal_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.dispatch = Histogram("panal_dispatch_seconds", "Time the dispatch policy takes to pick tasks "
                                  "for one lease request.", buckets=DISPATCH_BUCKETS, registry=self.registry)
        self.lease_service = Histogram("panal_lease_service_seconds", "Time the hub takes to serve a lease "
                                       "request: from the handler's start to its reply, less waiting for the "
                                       "client's body and the long-poll wait.", buckets=SERVICE_BUCKETS,
                                       registry=self.registry)
        self.registry.register(_BoardCollector(board.view, app, board.trust))
        self.registry.register(_WakeupCollector(board))
        board.time_dispatch(self.dispatch.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS_KEY = web.AppKey("metrics", BoardMetrics)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    route = _route(request)
    start = time.perf_counter()
    status = "500"
    with waits.tally() as waited:
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except (asyncio.CancelledError, ConnectionError):
            status = "499"   # the client went away
            raise
        finally:
            elapsed = time.perf_counter() - start
            metrics.requests.labels(request.method, route, status).inc()
            if route not in STREAMING_ROUTES:
                metrics.latency.labels(request.method, route).observe(elapsed)
            if route == LEASE_ROUTE and status != "499":
                metrics.lease_service.observe(elapsed - waited.seconds)


def add_metrics(app: web.Application, board: Board) -> None:
    """Register ``GET /metrics`` and the timing middleware (outermost: it sees the final status)."""
    metrics = app[METRICS_KEY] = BoardMetrics(board, app)
    app.middlewares.insert(0, metrics_middleware)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    app.router.add_get("/metrics", scrape)
