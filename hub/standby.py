"""A hub that is not the active one answers every request with ``503 + Retry-After`` and where to go.

Several hubs serve one PostgreSQL database (hub/election.py decides which is active). A standby
listens from the start, so agents and the CLI that try it learn at once that it is not the one:
``503``, code ``standby``, ``Retry-After``, and in ``details.active_hub`` the join URL of the active
hub as the database last said. Their clients (agent/client/board.py) move on to the next hub URL
they were given. A hub that *was* active and lost the lock answers the same way from that moment
(it acknowledges nothing more), and its ``panal hub serve`` exits so its supervisor restarts it as
a standby with fresh state. ``GET /v1/active`` is answered by every hub (who is active, per this one).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from hub.election import Election
from hub.http import Handler, error_middleware, reply
from security.errors import Unavailable

__all__ = ["ActiveGate", "Standby"]


class Standby(Unavailable):
    """This hub is a standby (or stepped down): come back later, or go to ``active_hub``."""

    def __init__(self, message: str, retry_after_s: float, active_hub: str | None) -> None:
        super().__init__(message, code="standby", details={"active_hub": active_hub} if active_hub else None)
        self.retry_after_s = retry_after_s


class ActiveGate:
    """Lets requests through only while this hub is active and its board has loaded its state."""

    def __init__(self, election: Election, retry_after_s: float = 1.0) -> None:
        self.election = election
        self.retry_after_s = retry_after_s
        self.ready = False      # set once the board has loaded the active state from the database
        self._app: web.Application | None = None
        self._deferred: list[Any] = []

    @property
    def open(self) -> bool:
        return self.ready and self.election.active

    def install(self, app: web.Application) -> None:
        """Put the gate right after the error middleware (it turns :class:`Standby` into the 503), and hold
        the app's start-up hooks (the status feed: it reads the board) until the board is loaded."""
        app.middlewares.insert(app.middlewares.index(error_middleware) + 1, self.middleware)
        app.router.add_get("/v1/active", self.describe)
        self._app = app
        self._deferred = list(app.on_startup)
        app.on_startup.clear()

    async def open_gate(self) -> None:
        """The board has loaded the active state: run the held start-up hooks, then let requests through."""
        assert self._app is not None, "open_gate before install"
        for hook in self._deferred:
            await hook(self._app)
        self.ready = True

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.open or request.path == "/v1/active":
            return await handler(request)
        known = self.election.last_known
        elsewhere = known.url if known is not None and known.hub != self.election.hub_id else None
        what = "lost its place as the active hub" if self.election.lost.is_set() else "is a standby"
        raise Standby(f"this hub ({self.election.hub_id}) {what}; retry, or use the active hub"
                      + (f" {elsewhere}" if elsewhere else ""), self.retry_after_s, elsewhere)

    async def describe(self, request: web.Request) -> web.StreamResponse:
        """Public: whether this hub is active, and who is as far as it knows (no secrets: names and URLs)."""
        known = self.election.last_known
        body: dict[str, Any] = {"hub": self.election.hub_id, "active": self.open, "now": time.time(),
                                "active_hub": None}
        if known is not None:
            body["active_hub"] = {"hub": known.hub, "url": known.url, "since": known.since, "token": known.token}
        return reply(request, body)
