"""Admission tokens: what lets a new agent register on a hub whose registration is not open.

A token is ``<id>.<secret>``. The hub stores only the id and the SHA-256 of the secret (a stolen
database admits nobody), so a token is shown once, when ``panal hub tokens create`` makes it; the id
alone names it in ``list`` and ``revoke``. A token admits at most ``max_uses`` new agents (0: any
number) until ``expires_at``, unless revoked first. Re-registering an agent the hub already knows
needs no token: its key is its proof.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

__all__ = ["AdmissionToken", "hash_secret", "new_token", "split_token"]

_TOKEN_RE = re.compile(r"^([0-9a-f]{8})\.([A-Za-z0-9_-]{16,64})$")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None."""
    m = _TOKEN_RE.match(text.strip())
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True)
class AdmissionToken:
    """One stored token (never its secret)."""

    id: str
    secret_hash: str
    label: str
    max_uses: int              # 0: unlimited
    uses: int
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    owner: str = ""            # the owner of the agents it admits ("": none): see AgentRow.owner

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_hash, hash_secret(secret))

    def refusal(self, now: float) -> str | None:
        """Why this token admits nobody now (``revoked``, ``expired``, ``used_up``), or None."""
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_uses and self.uses >= self.max_uses:
            return "used_up"
        return None


def new_token(label: str, max_uses: int, created_at: float, ttl_s: float,
              owner: str = "") -> tuple[AdmissionToken, str]:
    """A fresh token row and the text to hand out (``<id>.<secret>``: shown once, stored hashed)."""
    token_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(24)
    row = AdmissionToken(token_id, hash_secret(secret), label, max_uses, 0, created_at, created_at + ttl_s,
                         owner=owner)
    return row, f"{token_id}.{secret}"
