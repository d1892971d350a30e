"""Identities, RFC 9421 request signatures (checked against an independent library), records, TLS."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, InvalidSignature, algorithms

from security.errors import BadRequest, Unauthorized
from security.httpsig import content_digest, sign_request, verify_request
from security.identity import Identity, PublicKey
from security.records import SignedRecord, canonical
from security.replay import ReplayCache
from security.tls import BoardAddress, cert_fingerprint, make_self_signed


def test_identity_is_saved_private_and_round_trips(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "keys" / "agent.key"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.id == ident.id
    assert PublicKey.parse(ident.public.text()).id == ident.id
    assert Identity.load_or_create(path).id == ident.id


def test_public_key_parse_rejects_garbage() -> None:
    for bad in ("", "rsa:abc", "ed25519:!!!", "ed25519:" + "A" * 10):
        with pytest.raises(BadRequest):
            PublicKey.parse(bad)


def _verify(ident: Identity, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
            skew: float = 300, now: float | None = None) -> str:
    def lookup(key_id: str) -> PublicKey | None:
        return ident.public if key_id == ident.id else None
    return verify_request(method, path, query, headers, body, lookup, skew, now=now).keyid


def test_signed_request_verifies_and_tampering_fails() -> None:
    ident = Identity.generate()
    body = b'{"slots": 2}'
    headers = sign_request(ident, "POST", "/v1/lease", "", body)
    assert _verify(ident, "POST", "/v1/lease", "", headers, body) == ident.id
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "POST", "/v1/lease", "", headers, b'{"slots": 64}')
    assert exc.value.code == "bad_digest"
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "POST", "/v1/results", "", headers, body)
    assert exc.value.code == "bad_signature"
    forged = dict(headers, **{"content-digest": content_digest(b"x")})
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "POST", "/v1/lease", "", forged, b"x")
    assert exc.value.code == "bad_signature"


def test_unsigned_stale_and_unknown_key_are_specific() -> None:
    ident, other = Identity.generate(), Identity.generate()
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "GET", "/v1/jobs", "", {}, b"")
    assert exc.value.code == "unsigned"
    old = sign_request(ident, "GET", "/v1/jobs", "", b"", now=1_000_000)
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "GET", "/v1/jobs", "", old, b"", now=1_000_000 + 301)
    assert exc.value.code == "stale_signature"
    foreign = sign_request(other, "GET", "/v1/jobs", "", b"")
    with pytest.raises(Unauthorized) as exc:
        _verify(ident, "GET", "/v1/jobs", "", foreign, b"")
    assert exc.value.code == "unknown_key"


def test_query_is_covered() -> None:
    ident = Identity.generate()
    headers = sign_request(ident, "GET", "/v1/jobs", "state=queued", b"")
    assert _verify(ident, "GET", "/v1/jobs", "state=queued", headers, b"")
    with pytest.raises(Unauthorized):
        _verify(ident, "GET", "/v1/jobs", "state=failed", headers, b"")


def test_replay_cache_rejects_reuse_until_it_could_no_longer_verify() -> None:
    cache = ReplayCache(skew_s=10)
    cache.check("k", "n1", now=100)
    with pytest.raises(Unauthorized) as exc:
        cache.check("k", "n1", now=105)
    assert exc.value.code == "replay"
    cache.check("other", "n1", now=105)
    cache.check("k", "n1", now=100 + 21)  # past 2 x skew the old entry is gone (and would be stale)


class _Message:
    """The request shape the independent library reads: method, absolute url, headers."""

    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method, self.url, self.headers = method, url, headers


def test_our_signatures_verify_with_the_http_message_signatures_library() -> None:
    """Interop: an independent RFC 9421 implementation accepts what we produce, body digest included."""
    ident = Identity.generate()
    body = b'{"hello": "world"}'
    headers = sign_request(ident, "POST", "/v1/jobs", "state=queued", body)

    class Resolver(HTTPSignatureKeyResolver):
        def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
            assert key_id == ident.id
            return Ed25519PublicKey.from_public_bytes(ident.public.raw)

    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=Resolver())
    message = _Message("POST", "https://board.example/v1/jobs?state=queued", headers)
    [result] = verifier.verify(message, body=body, require_components=("@method", "@path", "@query",
                                                                        "content-digest"))
    assert result.parameters["keyid"] == ident.id
    assert result.body == body
    with pytest.raises(InvalidSignature):
        verifier.verify(message, body=b'{"hello": "mallory"}')
    with pytest.raises(InvalidSignature):
        verifier.verify(_Message("POST", "https://board.example/v1/agents?state=queued", headers))


def test_signed_record_detects_forgery_and_is_canonical() -> None:
    ident = Identity.generate()
    record = SignedRecord.sign(ident, {"b": 1, "a": {"y": 2, "x": [1, 2]}})
    assert record.verify() == {"a": {"x": [1, 2], "y": 2}, "b": 1}
    assert canonical({"b": 1, "a": 2}) == canonical({"a": 2, "b": 1})
    wire = record.to_wire()
    assert SignedRecord.from_wire(wire).verify()["b"] == 1
    tampered = SignedRecord(record.payload.replace(b"\x01", b"\x02"), record.sig, record.key)
    with pytest.raises(Unauthorized) as exc:
        tampered.verify()
    assert exc.value.code == "bad_record_signature"
    with pytest.raises(BadRequest):
        SignedRecord.from_wire({"payload": 1})


def test_tls_cert_fingerprint_and_join_url(tmp_path: Path) -> None:
    fp = make_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", ["127.0.0.1"])
    assert fp == cert_fingerprint(tmp_path / "c.pem") and len(fp) == 64
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    addr = BoardAddress.parse(f"https://127.0.0.1:8747/#sha256={fp}")
    assert addr.url == "https://127.0.0.1:8747" and addr.fingerprint == fp
    assert BoardAddress.parse(addr.join_url()) == addr
    addr.check_transport()
    with pytest.raises(BadRequest, match="pinned fingerprint"):
        BoardAddress.parse("https://hub.example:8747/").check_transport()
    with pytest.raises(BadRequest, match="plain HTTP"):
        BoardAddress.parse("http://hub.example:8747/").check_transport()
    BoardAddress.parse("http://127.0.0.1:8747/").check_transport()
    with pytest.raises(BadRequest, match="sha256"):
        BoardAddress.parse("https://h:1/#sha256=zz")
