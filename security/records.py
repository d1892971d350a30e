"""Canonical encoding and signing of records (manifests, results).

A signed record is ``{"payload": bytes, "sig": bytes, "key": "ed25519:..."}``: the payload is the
canonical msgpack encoding of a dict (keys sorted at every level), so any party can re-check the
signature offline without trusting whoever relayed it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import msgpack

from security.errors import BadRequest, Unauthorized
from security.identity import Identity, PublicKey

__all__ = ["SignedRecord", "canonical", "decode"]


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def canonical(value: dict[str, Any]) -> bytes:
    """Deterministic msgpack bytes for a dict (sorted keys, no floats re-typed)."""
    return msgpack.packb(_sorted(value), use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(f"malformed msgpack record: {exc}") from exc


def _bytes(value: Any) -> Any:
    """JSON clients send bytes as base64 strings; msgpack clients send bytes."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return value
    return value


@dataclass(frozen=True)
class SignedRecord:
    payload: bytes
    sig: bytes
    key: PublicKey

    @classmethod
    def sign(cls, identity: Identity, value: dict[str, Any]) -> SignedRecord:
        payload = canonical(value)
        return cls(payload, identity.sign(payload), identity.public)

    def verify(self) -> dict[str, Any]:
        """Check the signature and return the decoded payload; raise ``Unauthorized`` if forged."""
        if not self.key.verify(self.sig, self.payload):
            raise Unauthorized(f"record signature does not verify for key {self.key.id}",
                               code="bad_record_signature")
        value = decode(self.payload)
        if not isinstance(value, dict):
            raise BadRequest("signed record payload is not a map")
        return value

    def to_wire(self) -> dict[str, Any]:
        return {"payload": self.payload, "sig": self.sig, "key": self.key.text()}

    @classmethod
    def from_wire(cls, value: Any) -> SignedRecord:
        if not isinstance(value, dict):
            raise BadRequest("a signed record must be a map with payload, sig and key")
        payload, sig, key = (_bytes(value.get("payload")), _bytes(value.get("sig")), value.get("key"))
        if not isinstance(payload, bytes) or not isinstance(sig, bytes) or not isinstance(key, str):
            raise BadRequest("a signed record needs payload (bytes), sig (bytes) and key (str)")
        return cls(payload, sig, PublicKey.parse(key))
