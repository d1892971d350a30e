"""Who may register a new agent: an admission token from the join URL, or (open registration) anyone,
rate-limited per source address.

The decision is made from the request's headers and address alone, before the registration body is
decoded: a stranger without a token costs the hub a header check, not a parse. A token is counted
(``Store.use_admission_token``, atomic) only once the registration's signature has verified, so a
refused or forged request never uses one up. Known agents re-register without a token (hub/app.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from hub.config import HubConfig
from hub.ratelimit import RateLimiter
from hub.store import Store
from hub.tokens import AdmissionToken, hash_secret, split_token
from security.errors import Forbidden, TooManyRequests

__all__ = ["TOKEN_HEADER", "Admission", "Ticket"]

#: the header `panal agent join` sends the join URL's token in (never in the URL: URLs get logged)
TOKEN_HEADER = "Panal-Admission-Token"  # noqa: S105  (a header name, not a secret)
_ASK = ("ask the board's admin for a join URL made by `panal hub tokens create` and run "
        "`panal agent join URL`")


@dataclass(frozen=True)
class Ticket:
    """An admission not yet counted: the token to use once the registration verifies (None: open)."""

    token_id: str | None = None
    secret_hash: str = ""
    owner: str = ""                # the token's owner, given to the agent it admits


class Admission:
    def __init__(self, store: Store, config: HubConfig, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.mode = config.registration_mode
        # `registration: auto` on a hub bound to loopback only: every caller is this machine's own process
        # (`panal up`, the demo, tests, benches), not a stranger; an explicit `open` is always rate-limited.
        self.unlimited = config.registration == "auto" and config.loopback_only
        self.clock = clock
        self.monotonic = monotonic
        self.limiter = RateLimiter(config.registration_rate_per_min, config.registration_burst, monotonic)
        self._tokens: dict[str, AdmissionToken] = {}
        self._loaded_at = float("-inf")
        self._reading = asyncio.Lock()

    async def _token(self, token_id: str, fresh: bool = False) -> AdmissionToken | None:
        """The stored token (re-read at most once a second, or now when ``fresh``: the CLI edits the
        table while the hub runs). Callers that arrive during a re-read wait for it under the lock: looking
        in the table being replaced would refuse a token the admin has just made."""
        async with self._reading:
            now = self.monotonic()
            if fresh or now - self._loaded_at >= 1.0:
                self._tokens = {t.id: t for t in await self.store.list_admission_tokens()}
                self._loaded_at = now
        return self._tokens.get(token_id)

    async def check(self, request: web.Request) -> Ticket:
        """Admit or refuse a new agent's registration from its headers and address: a 403 naming why
        (no token, unknown, expired, revoked, used up) or, open, a 429 with Retry-After."""
        if self.mode == "open":
            address = request.remote or "?"
            if self.unlimited:
                return Ticket()
            wait_s = self.limiter.retry_after(address)
            if wait_s > 0:
                raise TooManyRequests(f"too many registrations from {address}; retry in {wait_s:.0f} s",
                                      retry_after_s=wait_s, code="registration_rate_limited")
            self.limiter.take(address)
            return Ticket()
        text = request.headers.get(TOKEN_HEADER, "").strip()
        if not text:
            raise Forbidden(f"registration on this board needs an admission token: {_ASK}", code="token_missing")
        parts = split_token(text)
        token = await self._token(parts[0]) if parts else None
        if parts is None or token is None or not token.matches(parts[1]):
            raise Forbidden(f"the admission token is not one this board issued: {_ASK}", code="token_unknown")
        self._refuse_if_unusable(token)
        return Ticket(token.id, hash_secret(parts[1]), token.owner)

    async def consume(self, ticket: Ticket) -> None:
        """Count the ticket's token once (atomic in the store); a 403 if it stopped admitting meanwhile."""
        if ticket.token_id is None:
            return
        if await self.store.use_admission_token(ticket.token_id, ticket.secret_hash, self.clock()):
            return
        token = await self._token(ticket.token_id, fresh=True)
        if token is None:
            raise Forbidden(f"the admission token is not one this board issued: {_ASK}", code="token_unknown")
        self._refuse_if_unusable(token)
        raise Forbidden(f"admission token {token.id} cannot be used now: {_ASK}", code="token_used_up")

    def _refuse_if_unusable(self, token: AdmissionToken) -> None:
        reason = token.refusal(self.clock())
        if reason == "revoked":
            raise Forbidden(f"admission token {token.id} was revoked by the board's admin: {_ASK}",
                            code="token_revoked")
        if reason == "expired":
            when = dt.datetime.fromtimestamp(token.expires_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise Forbidden(f"admission token {token.id} expired at {when}: {_ASK}", code="token_expired")
        if reason == "used_up":
            raise Forbidden(f"admission token {token.id} is used up ({token.uses} of {token.max_uses} "
                            f"registrations): {_ASK}", code="token_used_up")

