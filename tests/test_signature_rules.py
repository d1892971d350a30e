"""Ed25519 on libsodium (security/identity.py): the same signatures as OpenSSL's, never accepting what OpenSSL
refuses (a peer still on the older check must not refuse what a newer one accepted), and refusing the small-order
keys that OpenSSL lets "sign" every message."""

from __future__ import annotations

import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from security.identity import Identity, PublicKey

#: the group order L; S + L is the same scalar as S, written non-canonically
ORDER = 2**252 + 27742317777372353535851937790883648493
#: canonical encodings of points of small order (1, 2, 4 and 8): none is a key that signs anything
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
)]


def openssl_accepts(key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_signatures_are_the_bytes_openssl_makes_and_each_library_accepts_the_others() -> None:
    rng = random.Random(7)
    for _ in range(50):
        ident = Identity.generate()
        data = rng.randbytes(rng.randrange(0, 2000))
        signature = ident.sign(data)
        assert signature == ident._key.sign(data)   # deterministic: an older peer made these very bytes
        assert ident.public.verify(signature, data) and openssl_accepts(ident.public.raw, signature, data)


def test_one_flipped_bit_in_the_signature_key_or_message_is_refused() -> None:
    rng = random.Random(11)
    ident = Identity.generate()
    data = b"a result record"
    good = ident.sign(data)
    for _ in range(3000):
        signature, key, message = bytearray(good), bytearray(ident.public.raw), bytearray(data)
        target = rng.choice((signature, key, message))
        target[rng.randrange(len(target))] ^= 1 << rng.randrange(8)
        assert not PublicKey(bytes(key)).verify(bytes(signature), bytes(message))


@pytest.mark.parametrize("point", SMALL_ORDER, ids=[p.hex()[:8] for p in SMALL_ORDER])
def test_a_small_order_key_signs_nothing(point: bytes) -> None:
    # R a small-order point and S = 0: with the identity as the key OpenSSL accepts this for any message
    for r in SMALL_ORDER:
        for message in (b"", b"submit 1,000 jobs as someone", bytes(200)):
            assert not PublicKey(point).verify(r + bytes(32), message)
    if point == SMALL_ORDER[0]:
        assert openssl_accepts(point, SMALL_ORDER[0] + bytes(32), b"any message")   # why the stricter rules matter


def test_a_non_canonical_scalar_is_refused_by_both() -> None:
    ident = Identity.generate()
    data = b"payload"
    signature = ident.sign(data)
    s = int.from_bytes(signature[32:], "little") + ORDER   # S < L < 2**253: S + L fits 32 bytes
    twisted = signature[:32] + s.to_bytes(32, "little")
    assert not ident.public.verify(twisted, data) and not openssl_accepts(ident.public.raw, twisted, data)


def test_bytes_like_signatures_and_messages_are_checked_as_bytes() -> None:
    ident = Identity.generate()
    signature = ident.sign(b"data")
    assert ident.public.verify(bytearray(signature), memoryview(b"data"))
    assert not ident.public.verify(memoryview(signature), bytearray(b"date"))


@pytest.mark.parametrize("signature", [b"", bytes(63), bytes(65), "not bytes", None, bytes(128)])
def test_a_malformed_signature_is_refused_without_an_exception(signature: object) -> None:
    ident = Identity.generate()
    good = ident.sign(b"x")
    assert not ident.public.verify(signature, b"x")  # type: ignore[arg-type]
    # a 128-byte "signature" must not be split into signature + the first 64 bytes of a message
    assert not ident.public.verify(good + b"x" * 64, b"")
