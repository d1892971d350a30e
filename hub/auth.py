"""Who is calling: signature verification, replay protection and roles for board requests.

Agents are known from registration; submitters from the store's ``submitters`` table, which the
hub admin edits with ``panal hub submitters add`` (on a LAN board: the agent, from its trust store)
while the board runs, so an unknown key makes the board re-read that table (at most once a second)
before refusing.

Authenticate before you parse: every check here runs over the raw body bytes and the headers, and a
handler decodes its body only after :meth:`Authenticator.agent` / :meth:`submitter` returned (or, for
registration, after admission said yes: hub/admission.py). An unsigned 4 MB body is refused unparsed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from hub.board import Board
from security.errors import Forbidden, Unauthorized
from security.httpsig import SignatureInput, SignatureParams, check_request, content_digest, verify_key
from security.identity import PublicKey
from security.replay import ReplayCache

__all__ = ["Authenticator", "Caller"]


@dataclass(frozen=True)
class Caller:
    key_id: str
    body: bytes


class Authenticator:
    def __init__(self, board: Board, skew_s: float) -> None:
        self.board = board
        self.skew_s = skew_s
        self.replay = ReplayCache(skew_s)
        self.submitters: dict[str, tuple[PublicKey, str]] = {}
        self._loaded_at = 0.0

    async def refresh_submitters(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._loaded_at < 1.0:
            return
        self._loaded_at = now
        rows = await self.board.store.list_submitters()
        self.submitters = {key_id: (PublicKey.parse(text), name) for key_id, text, name in rows}

    def precheck(self, request: web.Request, body: bytes, body_digest: str | None = None) -> SignatureInput:
        """Everything but the key: signed, well-formed, fresh, and the body matches its Content-Digest."""
        return check_request(request.method, request.path, request.query_string, request.headers, body,
                             self.skew_s, body_digest=body_digest)

    def finish(self, request: web.Request, checked: SignatureInput, key: PublicKey | None) -> SignatureParams:
        """The signature verifies with ``key`` (None: unknown key) and its nonce is new."""
        params = verify_key(checked, request.method, request.path, request.query_string, request.headers, key)
        self.replay.check(params.keyid, params.nonce)
        return params

    async def verify(self, request: web.Request, extra_key: PublicKey | None = None,
                     body: bytes | None = None, body_digest: str | None = None) -> SignatureParams:
        """Verify the request's signature against known keys (and ``extra_key``, for registration)."""
        if body is None:
            body = b"" if body_digest is not None else await request.read()
        checked = self.precheck(request, body, body_digest)
        keyid = checked.params.keyid
        if keyid not in self.board.agents and keyid not in self.submitters \
                and (extra_key is None or extra_key.id != keyid):
            await self.refresh_submitters()
        return self.finish(request, checked, self._lookup(keyid, extra_key))

    def _lookup(self, key_id: str, extra_key: PublicKey | None = None) -> PublicKey | None:
        if extra_key is not None and extra_key.id == key_id:
            return extra_key
        agent = self.board.agents.get(key_id)
        if agent is not None:
            return agent.key
        entry = self.submitters.get(key_id)
        return entry[0] if entry else None

    async def agent(self, request: web.Request, body: bytes) -> str:
        params = await self.verify(request, body=body)
        if params.keyid not in self.board.agents:
            raise Forbidden(f"key {params.keyid} is not a registered agent: run `panal agent join`",
                            code="not_registered")
        return params.keyid

    async def member(self, request: web.Request, body_digest: str | None) -> str:
        """Blob transfers: any registered agent or authorised submitter (body streamed, digest signed)."""
        params = await self.verify(request, body_digest=body_digest or content_digest(b""))
        if params.keyid not in self.board.agents and params.keyid not in self.submitters:
            raise Forbidden(f"key {params.keyid} is neither an agent nor a submitter on this board",
                            code="not_a_member")
        return params.keyid

    async def uploader(self, request: web.Request, body_digest: str | None) -> str:
        """Opening a resumable upload (disk and a session slot held for minutes): an authorised submitter
        (its inputs), or an agent while it holds a lease (its outputs and checkpoints). A key that only
        registered (free under open registration) has nothing to upload yet."""
        key_id = await self.member(request, body_digest)
        agent = self.board.agents.get(key_id)
        if key_id not in self.submitters and agent is not None and not agent.running:
            raise Forbidden(f"agent {key_id} holds no lease on this board: an agent opens uploads only for a "
                            "task it runs", code="no_lease_for_upload")
        return key_id

    async def submitter(self, request: web.Request, body: bytes,
                        body_key: Callable[[], PublicKey | None] | None = None) -> str:
        """Verify and require an authorised submitter. ``body_key`` (the key a submitted manifest
        carries, read from the body) is asked for only when the signing key is unknown: it lets an
        unknown key prove itself, so it gets a 403 naming it rather than a 401."""
        try:
            params = await self.verify(request, body=body)
        except Unauthorized as exc:
            if exc.code != "unknown_key" or body_key is None:
                raise
            # The signature is well-formed, fresh and matches the body's digest: worth decoding it.
            key = body_key()
            if key is None:
                raise
            params = await self.verify(request, extra_key=key, body=body)
        await self.refresh_submitters()  # at most once a second: a revoked key stops working within 1 s
        if params.keyid not in self.submitters:
            await self.refresh_submitters(force=True)
        if params.keyid not in self.submitters:
            known = self._lookup(params.keyid) or (body_key() if body_key is not None else None)
            raise Forbidden(self._not_a_submitter(params.keyid, known if known and known.id == params.keyid
                                                  else None), code="not_a_submitter")
        return params.keyid

    def _not_a_submitter(self, key_id: str, public: PublicKey | None) -> str:
        """Who can let ``key_id`` in, and how: a LAN board's owner trusts keys on their agent."""
        if public is not None:
            name = key = public.text()
            note = f" (key id {key_id})"
        else:
            name, key, note = key_id, "KEY", " (KEY: what the submitter's `panal keys show` prints)"
        if self.board.config.lan:
            return (f"key {name} is not an authorised submitter on this LAN board: ask the owner of its "
                    f"agent to run `panal trust add {key}` there{note}")
        return (f"key {name} is not an authorised submitter on this board: ask its admin to run "
                f"`panal hub submitters add {key}`{note}")
