"""Ed25519 identities: every agent, submitter and hub has one; its id is a key fingerprint.

Keys are kept and saved with ``cryptography`` (PEM, PKCS#8); signing and checking run on libsodium (PyNaCl): its
verify takes about half of OpenSSL's time, and a submit-to-result round trip checks four signatures on the hub
alone. libsodium is also the stricter of the two: it refuses public keys and signature points of small order and
non-canonical encodings, which OpenSSL accepts (the identity point as a public key "signs" every message there).
Anything it accepts OpenSSL accepts too, so a peer still on the older check never refuses what this one signed
(``tests/test_signature_rules.py``). Signatures are deterministic: both libraries make the same bytes.

A long message (from OPENSSL_FROM_BYTES) is checked by OpenSSL after libsodium's extra rules, applied here on the
encodings: there libsodium's portable SHA-512 and the copies PyNaCl makes of signature + message cost more than
its faster arithmetic saves. The verdict is libsodium's either way.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import CryptoError

from security.errors import BadRequest

__all__ = ["Identity", "PublicKey", "key_id"]

PUBLIC_KEY_PREFIX = "ed25519:"
SIGNATURE_BYTES = 64
_BYTES = (bytes, bytearray, memoryview)
#: From this many bytes on, OpenSSL checks the equation (after libsodium's extra rules, applied here): libsodium's
#: portable SHA-512 and PyNaCl's three copies of signature + message lose there (measured on this machine, best of
#: 7: 64 KiB 170 us vs 163 us; 4 MiB 17 ms vs 7 ms and 4 MiB more peak RSS; 200 B 41 us vs 82 us).
OPENSSL_FROM_BYTES = 64 << 10
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_Y = (1 << 255) - 1   # an encoding's y; its top bit is x's sign
#: y of the eight points of order dividing 8 (libsodium's blocklist, read mod p: its p and p + 1 are 0 and 1)
_SMALL_ORDER_Y = frozenset({0, 1, _P - 1,
                            0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
                            0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7})


def key_id(raw_public_key: bytes) -> str:
    """A short, stable id for a public key: base32 of the first 15 bytes of its SHA-256 (24 chars)."""
    digest = hashlib.sha256(raw_public_key).digest()[:15]
    return base64.b32encode(digest).decode().lower()


@dataclass(frozen=True)
class PublicKey:
    """A peer's public key, as carried on the wire and printed for humans (``ed25519:<base64>``)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise BadRequest(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")

    @cached_property
    def id(self) -> str:
        # asked for several times per request (signer checks, lookups, log lines): a SHA-256 and a base32 each
        return key_id(self.raw)

    def text(self) -> str:
        return PUBLIC_KEY_PREFIX + base64.b64encode(self.raw).decode()

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``ed25519:<base64>`` (the prefix is optional)."""
        body = text.strip().removeprefix(PUBLIC_KEY_PREFIX)
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError as exc:
            raise BadRequest(f"not a public key (expected ed25519:<base64>): {text[:60]!r}") from exc
        return cls(raw)

    def verify(self, signature: bytes | bytearray | memoryview, data: bytes | bytearray | memoryview) -> bool:
        """Whether ``signature`` is this key's over ``data`` (libsodium's rules: see the module's docstring)."""
        if not isinstance(signature, _BYTES) or not isinstance(data, _BYTES):
            return False
        # libsodium takes signature + message as one string, so the signature's length in BYTES fixes the split:
        # len() of a memoryview counts items (a 'H' or 2-D view of 128 bytes has len 64), which let a signature
        # over P + Q pass as one over Q. Measured after the copy to bytes, which is what is concatenated.
        try:
            sig, message = bytes(signature), data if type(data) is bytes else bytes(data)
        except (ValueError, TypeError, BufferError):   # a released view: nothing to check, not a server error
            return False
        if len(sig) != SIGNATURE_BYTES:
            return False
        if len(message) >= OPENSSL_FROM_BYTES:
            return self._verify_long(sig, message)
        try:
            crypto_sign_open(sig + message, self.raw)
        except (CryptoError, ValueError, TypeError):
            return False
        return True

    @cached_property
    def _openssl(self) -> Ed25519PublicKey | None:
        """OpenSSL's key for long messages; None for a key libsodium refuses whatever it signs: y not canonical
        (>= p) or a point of small order. Past those, both decode the key alike (x = 0 only at small order)."""
        y = int.from_bytes(self.raw, "little") & _Y
        if y >= _P or y in _SMALL_ORDER_Y:
            return None
        try:
            return Ed25519PublicKey.from_public_bytes(self.raw)
        except ValueError:   # (a point off the curve fails at verify today: refused either way)
            return None

    def _verify_long(self, sig: bytes, data: bytes) -> bool:
        """libsodium's verdict by OpenSSL's check: libsodium = its rules on the key, R of small order refused,
        S < L, then the equation both libraries check alike ([S]B - [h]A encodes to R's very bytes, h over the
        encodings as given). ``tests/test_signature_rules.py`` holds the two paths to one verdict on every case."""
        key = self._openssl
        r_y = (int.from_bytes(sig[:32], "little") & _Y) % _P
        if key is None or r_y in _SMALL_ORDER_Y or int.from_bytes(sig[32:], "little") >= _L:
            return False
        try:
            key.verify(sig, data)
        except InvalidSignature:
            return False
        return True


class Identity:
    """A private Ed25519 key with its public half; saved as PEM with mode 0600."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        seed = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        raw, self._secret = crypto_sign_seed_keypair(seed)   # libsodium's 64-byte secret: the seed and public key
        self.public = PublicKey(raw)

    @property
    def id(self) -> str:
        return self.public.id

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        """The signature over ``data``; bytes-like as OpenSSL took it (libsodium's binding takes only bytes). The same
        bytes from either library (deterministic): a long message is OpenSSL's (4 MiB: 10 ms against libsodium's 30,
        which hashes it twice with its portable SHA-512 and copies it twice more)."""
        message = data if type(data) is bytes else bytes(data)
        if len(message) >= OPENSSL_FROM_BYTES:
            return self._key.sign(message)
        return crypto_sign(message, self._secret)[:SIGNATURE_BYTES]

    def save(self, path: Path) -> None:
        """Write the private key; the file is created 0600 so no other user ever sees it."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise BadRequest(f"{path}: not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident
