"""RFC 9421 HTTP Message Signatures (Ed25519) with RFC 9530 ``Content-Digest``.

A small implementation of exactly the profile panal uses, because the hot path (every lease and
result call) must be cheap and async-friendly. Its output is checked against the independent
``http-message-signatures`` library in the tests. Covered components: ``@method``, ``@path``,
``@query`` (when the request has one) and ``content-digest``; parameters: ``created``, ``keyid``,
``nonce`` and ``alg="ed25519"``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from security.errors import BadRequest, Unauthorized
from security.identity import Identity, PublicKey

__all__ = ["SignatureInput", "SignatureParams", "check_request", "content_digest",
           "require_signature_headers", "sign_request", "sign_request_digest", "verify_key", "verify_request"]

LABEL = "panal"
_INPUT_RE = re.compile(r'^\s*([a-z][a-z0-9_.*-]*)=\(([^)]*)\)((?:;[a-z]+=(?:"[^"]*"|-?\d+))*)\s*$')
_PARAM_RE = re.compile(r';([a-z]+)=("[^"]*"|-?\d+)')
_SIG_RE = re.compile(r"^\s*([a-z][a-z0-9_.*-]*)=:([A-Za-z0-9+/=]*):\s*$")
REQUIRED = ("@method", "@path", "content-digest")
#: the longest nonce (and key id) a signature may carry (ours: 22 and 24 characters)
MAX_NONCE_CHARS = 128
_MAX_CREATED_DIGITS = 12  # a Unix time in seconds; more digits is garbage, not a timestamp


def content_digest(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


@dataclass(frozen=True)
class SignatureParams:
    """What a verified signature tells the server: who signed, when, with which nonce."""

    keyid: str
    created: int
    nonce: str


def _component(name: str, method: str, path: str, query: str, headers: Mapping[str, str]) -> str:
    if name == "@method":
        return method.upper()
    if name == "@path":
        return path or "/"
    if name == "@query":
        return "?" + query
    value = headers.get(name)
    if value is None:
        raise Unauthorized(f"signed header {name!r} is missing from the request", code="bad_signature")
    return value.strip()


def _signature_base(components: list[str], params_text: str, method: str, path: str, query: str,
                    headers: Mapping[str, str]) -> bytes:
    lines = [f'"{c}": {_component(c, method, path, query, headers)}' for c in components]
    inner = " ".join(f'"{c}"' for c in components)
    lines.append(f'"@signature-params": ({inner}){params_text}')
    return "\n".join(lines).encode()


def sign_request(identity: Identity, method: str, path: str, query: str, body: bytes,
                 now: float | None = None) -> dict[str, str]:
    """Return the headers (Content-Digest, Signature-Input, Signature) that sign this request."""
    return sign_request_digest(identity, method, path, query, content_digest(body), now)


def sign_request_digest(identity: Identity, method: str, path: str, query: str, digest_header: str,
                        now: float | None = None) -> dict[str, str]:
    """Like :func:`sign_request`, with a precomputed ``Content-Digest`` value.

    For streamed bodies (blob uploads) the client hashes the file first and signs that digest;
    the server checks the streamed bytes against it as they arrive.
    """
    headers = {"content-digest": digest_header}
    components = ["@method", "@path", *(["@query"] if query else []), "content-digest"]
    created = int(now if now is not None else time.time())
    params_text = (f';created={created};keyid="{identity.id}"'
                   f';nonce="{secrets.token_urlsafe(16)}";alg="ed25519"')
    base = _signature_base(components, params_text, method, path, query, headers)
    inner = " ".join(f'"{c}"' for c in components)
    sig = base64.b64encode(identity.sign(base)).decode()
    headers["signature-input"] = f"{LABEL}=({inner}){params_text}"
    headers["signature"] = f"{LABEL}=:{sig}:"
    return headers


@dataclass(frozen=True)
class SignatureInput:
    """A request's signature headers, parsed and checked for everything but the key: the signature
    covers what it must, is fresh, and the body matches its ``Content-Digest``."""

    params: SignatureParams
    components: list[str]
    params_text: str
    signature: bytes


def require_signature_headers(headers: Mapping[str, str]) -> None:
    """A 401 ``unsigned`` for a request without its signature headers: checkable from the head alone, so
    the hub refuses an unsigned request before it reads (and decrypts) a body of up to its size limit."""
    if not headers.get("signature-input") or not headers.get("signature"):
        raise Unauthorized("request is not signed (Signature and Signature-Input headers required)",
                           code="unsigned")


def check_request(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
                  skew_s: float, now: float | None = None, body_digest: str | None = None) -> SignatureInput:
    """Everything :func:`verify_request` checks that needs no key, over the raw body bytes: the hub
    runs this before it decodes a body, so an unsigned or mis-digested body is refused unparsed."""
    require_signature_headers(headers)
    sig_input, sig_header = headers["signature-input"], headers["signature"]
    m = _INPUT_RE.match(sig_input)
    s = _SIG_RE.match(sig_header)
    if not m or not s or m.group(1) != s.group(1):
        raise Unauthorized("malformed Signature-Input or Signature header", code="bad_signature")
    components = re.findall(r'"([^"]+)"', m.group(2))
    params = {k: v.strip('"') for k, v in _PARAM_RE.findall(m.group(3))}
    missing = [c for c in REQUIRED if c not in components]
    if missing or (query and "@query" not in components):
        raise Unauthorized(f"signature must cover {', '.join(REQUIRED)} (and @query if any)",
                           code="bad_signature")
    if params.get("alg", "ed25519") != "ed25519":
        raise Unauthorized(f"unsupported signature algorithm {params['alg']!r}", code="bad_signature")
    keyid, nonce, created_text = params.get("keyid"), params.get("nonce"), params.get("created")
    if not keyid or not nonce or not created_text:
        raise Unauthorized("signature parameters keyid, nonce and created are required",
                           code="bad_signature")
    if len(nonce) > MAX_NONCE_CHARS or len(keyid) > MAX_NONCE_CHARS:
        # the replay cache keeps every nonce for twice the skew: 7 KB nonces let one key hold gigabytes
        raise BadRequest(f"Signature-Input: nonce and keyid may be at most {MAX_NONCE_CHARS} characters",
                         code="bad_signature_input")
    created_digits = created_text.removeprefix("-")
    if not created_digits.isascii() or not created_digits.isdigit() or len(created_digits) > _MAX_CREATED_DIGITS:
        raise BadRequest(f"Signature-Input: created must be a Unix time in whole seconds, got {created_text[:40]!r}",
                         code="bad_signature_input")
    created = int(created_text)
    current = now if now is not None else time.time()
    if abs(current - created) > skew_s:
        raise Unauthorized(f"signature is stale: created {created}, server time {int(current)}, "
                           f"allowed skew {skew_s:g} s (check the clock)", code="stale_signature")
    expected_digest = body_digest if body_digest is not None else content_digest(body)
    if headers.get("content-digest", "").strip() != expected_digest:
        raise Unauthorized("Content-Digest does not match the body", code="bad_digest")
    try:
        signature = base64.b64decode(s.group(2), validate=True)
    except ValueError as exc:
        raise Unauthorized("signature is not valid base64", code="bad_signature") from exc
    return SignatureInput(SignatureParams(keyid=keyid, created=created, nonce=nonce), components, m.group(3),
                          signature)


def verify_key(checked: SignatureInput, method: str, path: str, query: str, headers: Mapping[str, str],
               key: PublicKey | None) -> SignatureParams:
    """The second half of :func:`verify_request`: the signature verifies with ``key`` (None: unknown)."""
    keyid = checked.params.keyid
    if key is None:
        raise Unauthorized(f"unknown key {keyid}: register or ask the board admin to add it",
                           code="unknown_key")
    base = _signature_base(checked.components, checked.params_text, method, path, query, headers)
    if not key.verify(checked.signature, base):
        raise Unauthorized(f"signature does not verify for key {keyid}", code="bad_signature")
    return checked.params


def verify_request(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
                   lookup_key: Callable[[str], PublicKey | None], skew_s: float,
                   now: float | None = None, body_digest: str | None = None) -> SignatureParams:
    """Verify a signed request; raise :class:`Unauthorized` with a specific reason if it fails
    (:class:`BadRequest` for a header that is not even well-formed, e.g. a non-integer ``created``).

    ``headers`` must be case-insensitive (aiohttp's CIMultiDict is). Replay (nonce reuse) is
    checked by the caller with the returned params, after the signature is known to be good.
    For a streamed body pass ``body_digest`` (the ``Content-Digest`` value the body must have,
    e.g. derived from a blob's sha256) instead of ``body``; the caller then checks the streamed
    bytes against it.
    """
    checked = check_request(method, path, query, headers, body, skew_s, now, body_digest)
    return verify_key(checked, method, path, query, headers, lookup_key(checked.params.keyid))
