"""Ed25519 on libsodium (security/identity.py): the same signatures as OpenSSL's, never accepting what OpenSSL
refuses (a peer still on the older check must not refuse what a newer one accepted), and refusing the small-order
keys that OpenSSL lets "sign" every message."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign

import tests.ed25519_points as ed
from security import identity
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


# -- hostile review (issue 19): the split, bytes-like signing, and the edge cases of "Taming the many EdDSAs" ------

def test_a_signature_view_longer_than_64_bytes_never_moves_the_split_into_the_message() -> None:
    """len() of a memoryview counts items: a 'H' view (or a 64 x 2 one) of 128 bytes has len 64. It passed the
    length check, and signature + message was joined from its 128 bytes: a signature over P + Q was accepted as
    one over Q alone."""
    ident = Identity.generate()
    prefix = b"P" * 64
    signature = ident.sign(prefix + b"Q")
    for view in (memoryview(signature + prefix).cast("H"), memoryview(signature + prefix).cast("B", (64, 2))):
        assert len(view) == 64 and view.nbytes == 128
        assert not ident.public.verify(view, b"Q")
    assert ident.public.verify(memoryview(signature).cast("H"), prefix + b"Q")   # 64 bytes, whatever the view


class _LyingLength(bytes):
    def __len__(self) -> int:
        return 64


def test_a_bytes_subclass_that_lies_about_its_length_is_refused() -> None:
    ident = Identity.generate()
    signature = ident.sign(b"P" * 64 + b"Q")
    assert not ident.public.verify(_LyingLength(signature + b"P" * 64), b"Q")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_data_is_signed_as_openssl_signed_it(kind: type) -> None:
    ident = Identity.generate()
    data = b"a result record"
    assert ident.sign(kind(data)) == ident._key.sign(data)


#: RFC 8032, 7.1, tests 1 (the empty message) and 2: seed, public key, message, signature
RFC_8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]


#: the key files of those seeds, as ``Identity.save`` wrote them before libsodium (PKCS#8 PEM)
KEY_FILES = {
    "9d61b19d": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n"
                b"-----END PRIVATE KEY-----\n",
    "4ccd089b": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEzNCJso/5banbbDRuwRTg9bijGfNaumJNqM9u1PuKb7\n"
                b"-----END PRIVATE KEY-----\n",
}


@pytest.mark.parametrize(("seed", "public", "message", "expected"), RFC_8032, ids=["empty message", "one byte"])
def test_a_key_file_written_before_loads_and_signs_the_rfc_8032_bytes(
        tmp_path: Path, seed: str, public: str, message: str, expected: str) -> None:
    """A key saved as before (PKCS#8 PEM through ``cryptography``) loads to the same key and signs the published
    bytes, an empty message included (libsodium's signed message is then the 64 bytes of the signature alone)."""
    path = tmp_path / "agent.key"
    path.write_bytes(KEY_FILES[seed[:8]])   # as the agent wrote it before (PKCS#8 PEM, byte for byte)
    Identity(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))).save(tmp_path / "now.key")
    assert (tmp_path / "now.key").read_bytes() == path.read_bytes()   # and as it writes it now
    loaded = Identity.load(path)
    assert loaded.public.raw == bytes.fromhex(public)
    signature, data = bytes.fromhex(expected), bytes.fromhex(message)
    assert loaded.sign(data) == signature and loaded.public.verify(signature, data)
    assert not loaded.public.verify(signature, b"\x00")


def test_a_released_view_is_refused_without_an_exception() -> None:
    ident = Identity.generate()
    signature, data = memoryview(ident.sign(b"x")), memoryview(b"x")
    assert ident.public.verify(signature, data)
    signature.release()
    assert not ident.public.verify(signature, b"x")
    live = memoryview(ident.sign(b"x"))
    data.release()
    assert not ident.public.verify(live, data)


#: novifinancial/ed25519-speccheck cases.json, cases 0-9 (message, key, signature); of these libsodium accepts only
#: case 3 (its results.md), OpenSSL 3 cases 0-3
SPECCHECK = [
    ("8c93255d71dcab10e8f379c26200f3c7bd5f09d9bc3068d3ef4edeb4853022b6",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
     "0000000000000000000000000000000000000000000000000000000000000000"),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43"
     "a5bb704786be79fc476f91d3f3f89b03984d8068dcf1bb7dfc6637b45450ac04"),
    ("aebf3f2601a0c8c5d39cc7d8911642f740b78168218da8471772b35f9d35b9ab",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"
     "8c4bd45aecaca5b24fb97bc10ac27ac8751a7dfe1baff8b953ec9f5833ca260e"),
    ("9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "9046a64750444938de19f227bb80485e92b83fdb4b6506c160484c016cc1852f"
     "87909e14428a7a1d62e9f22f3d3ad7802db02eb2e688b6c52fcd6648a98bd009"),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "160a1cb0dc9c0258cd0a7d23e94d8fa878bcb1925f2c64246b2dee1796bed512"
     "5ec6bc982a269b723e0668e540911a9a6a58921d6925e434ab10aa7940551a09"),
    ("e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
     "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
     "21122a84e0b5fca4052f5b1235c80a537878b38f3142356b2c2384ebad4668b7"
     "e40bc836dac0f71076f9abe3a53f9c03c1ceeeddb658d0030494ace586687405"),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "e96f66be976d82e60150baecff9906684aebb1ef181f67a7189ac78ea23b6c0e"
     "547f7690a0e2ddcd04d87dbc3490dc19b3b3052f7ff0538cb68afb369ba3a514"),
    ("85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
     "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
     "8ce5b96c8f26d0ab6c47958c9e68b937104cd36e13c33566acd2fe8d38aa1942"
     "7e71f98a473474f2f13f06f97c20d58cc3f54b8bd0d272f42b695dd7e89a8c22"),
    ("fdaebc429f4a735932a160da1301080c13280eea8bc280d1b392c6b9e6ba3a5a",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
     "454d370c8d9fc323a41450f8d513eafeb5b0697390c1e505a0d4ddc71f566607"),
    ("84b698d39be126ff55fe45079e6c8bf64a0d7db6994560b4e96b7021eb39c1a1",
     "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
     "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
     "084d5b99c2a9463d9c8bd5026916996984eeec87ddf1d3be329006ace1b37b09"),
]


def test_the_speccheck_vectors_libsodium_accepts_only_its_one_and_openssl_accepts_it_too() -> None:
    ours, openssl = set(), set()
    for i, (message, key, signature) in enumerate(SPECCHECK):
        m, k, s = bytes.fromhex(message), bytes.fromhex(key), bytes.fromhex(signature)
        if PublicKey(k).verify(s, m):
            ours.add(i)
        if openssl_accepts(k, s, m):
            openssl.add(i)
    assert ours == {3}
    assert ours <= openssl and {0, 1, 2} <= openssl   # OpenSSL's small-order cases: why the stricter rules matter


def _sign_with(a: int, key: bytes, r_point: ed.Point, r_scalar: int, message: bytes) -> tuple[bytes, int]:
    """(R, S) by the scheme's formula with the given key ENCODING and nonce point (any order, any encoding)."""
    r = ed.encode(r_point)
    return r, (r_scalar + ed.challenge(r, key, message) * a) % ed.L


def _hostile_cases() -> list[tuple[str, bytes, bytes, bytes, bool]]:
    """(name, key, signature, message, libsodium's answer) for keys and R of every order, non-canonical encodings
    and S >= L, each built so that the cofactorless equation both libraries check holds where the name says it
    is "valid": a refusal is then the extra rule's doing, not a broken signature."""
    rng = random.Random(19)
    cases: list[tuple[str, bytes, bytes, bytes, bool]] = []
    # small-order keys, every encoding (canonical, the sign bit set on x = 0, y + p), with S = 0 and R = -[h]A
    encodings = {ed.encode(t) for t in ed.T8}
    encodings |= {bytes(e[:31]) + bytes([e[31] | 0x80]) for e in encodings if ed.decode(e) is not None}
    encodings |= {nc for e in list(encodings) if (nc := ed.non_canonical(e)) is not None}
    for key in sorted(encodings):
        point = ed.decode(key)
        if point is None:
            continue
        for i in range(64):   # R = -[h]A holds for some message (h mod 8 decides it)
            message = b"small-order key %d" % i
            r = ed.encode(ed.T8[rng.randrange(8)])
            if ed.cofactorless_holds(r, key, 0, message):
                cases.append((f"small-order key {key.hex()[:8]}..{key.hex()[-2:]}", key, r + bytes(32), message,
                              False))
                break
        for i in range(64):   # and R of mixed order, [S]B - [h]A for a random S: the key's own rule refuses it
            message = b"small-order key, mixed R %d" % i
            s = rng.randrange(1, ed.L)
            r = ed.encode(ed.add(ed.mul(s, ed.B), ed.T8[rng.randrange(8)]))
            if ed.cofactorless_holds(r, key, s, message):
                cases.append((f"small-order key {key.hex()[:8]}..{key.hex()[-2:]} mixed R", key,
                              r + s.to_bytes(32, "little"), message, False))
                break
    # an honest key and a small-order R: R = identity, S = h * a ("valid" to OpenSSL, made only by the key holder)
    ident = Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))   # the same cases in every process
    a = _scalar(ident)
    for r_point in ed.T8[:1] + ed.T8[4:5]:
        message = b"small-order R"
        r, s = _sign_with(a, ident.public.raw, r_point, 0, message)
        if ed.cofactorless_holds(r, ident.public.raw, s, message):
            cases.append((f"small-order R {r.hex()[:8]}", ident.public.raw, r + s.to_bytes(32, "little"), message,
                          False))
    # mixed-order keys A = aB + T: valid (R's torsion = -[h]T, both libraries' equation holds) and not
    for k in range(1, 8):
        key = ed.encode(ed.add(ed.mul(a, ed.B), ed.T8[k]))
        found = {True: False, False: False}
        for i in range(200):
            message = b"mixed-order key %d/%d" % (k, i)
            nonce = rng.randrange(1, ed.L)
            r_point = ed.add(ed.mul(nonce, ed.B), ed.T8[rng.randrange(8)])
            r, s = _sign_with(a, key, r_point, nonce, message)
            holds = ed.cofactorless_holds(r, key, s, message)
            if not found[holds]:
                found[holds] = True
                cases.append((f"mixed-order key T{k} {'valid' if holds else 'cofactored only'}", key,
                              r + s.to_bytes(32, "little"), message, holds))
            if all(found.values()):
                break
    # S >= L: an honest signature with S + L, and S = L
    good = ident.sign(b"s")
    s = int.from_bytes(good[32:], "little")
    cases.append(("S + L", ident.public.raw, good[:32] + (s + ed.L).to_bytes(32, "little"), b"s", False))
    cases.append(("S = L", ident.public.raw, good[:32] + ed.L.to_bytes(32, "little"), b"s", False))
    # a non-canonical R (the identity as y = 1 + p) with S = h * a, whose point IS the identity
    message = b"non-canonical R"
    r = bytes(ed.non_canonical(ed.encode(ed.IDENTITY)) or b"")
    s = ed.challenge(r, ident.public.raw, message) * a % ed.L
    cases.append(("non-canonical R", ident.public.raw, r + s.to_bytes(32, "little"), message, False))
    return sorted(cases)   # one order in every process (pytest-xdist compares the collections)


def _scalar(ident: Identity) -> int:
    """The secret scalar a of an identity (RFC 8032: the clamped first half of SHA-512(seed))."""
    seed = ident._secret[:32]
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return int.from_bytes(h, "little")


HOSTILE = _hostile_cases()


@pytest.mark.parametrize(("name", "key", "signature", "message", "sodium"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_edge_cases_follow_libsodiums_rules_and_openssl_accepts_all_it_accepts(
        name: str, key: bytes, signature: bytes, message: bytes, sodium: bool) -> None:
    ours = PublicKey(key).verify(signature, message)
    assert ours is sodium
    assert not ours or openssl_accepts(key, signature, message)   # never accepted here and refused by an older peer


def test_the_hostile_cases_cover_each_family() -> None:
    names = " | ".join(c[0] for c in HOSTILE)
    for family in ("small-order key", "small-order R", "mixed-order key T1 valid", "cofactored only", "S + L",
                   "non-canonical R"):
        assert family in names
    assert sum(c[0].startswith("small-order key") for c in HOSTILE) >= 10   # every encoding, not just the 8 points


# -- the long path: OpenSSL's check after libsodium's rules (security/identity.py OPENSSL_FROM_BYTES) ----------------

def _both_paths(monkeypatch: pytest.MonkeyPatch, key: bytes, signature: bytes, message: bytes) -> tuple[bool, bool]:
    """(libsodium's verdict, the long path's) on the same input: the threshold moved, nothing else."""
    monkeypatch.setattr(identity, "OPENSSL_FROM_BYTES", 1 << 62)
    sodium = PublicKey(key).verify(signature, message)
    monkeypatch.setattr(identity, "OPENSSL_FROM_BYTES", 0)
    return sodium, PublicKey(key).verify(signature, message)


def _every_case() -> list[tuple[str, bytes, bytes, bytes]]:
    cases = [(name, key, sig, message) for name, key, sig, message, _ in HOSTILE]
    cases += [(f"speccheck {i}", bytes.fromhex(k), bytes.fromhex(s), bytes.fromhex(m))
              for i, (m, k, s) in enumerate(SPECCHECK)]
    # small-order R and S = 0 under every small-order key encoding, and off-curve keys (y = 2 is not a point)
    for key in sorted({ed.encode(t) for t in ed.T8} | {(2).to_bytes(32, "little"), bytes(31) + b"\x80"}):
        cases += [(f"S = 0 key {key.hex()[:8]}..{key.hex()[-2:]} R {ed.encode(t).hex()[:8]}..{ed.encode(t).hex()[-2:]}",
                   key, ed.encode(t) + bytes(32), b"m") for t in ed.T8]
    ident = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    good = ident.sign(b"m")
    cases += [("good", ident.public.raw, good, b"m"), ("other message", ident.public.raw, good, b"n")]
    return cases


@pytest.mark.parametrize(("name", "key", "signature", "message"), _every_case(), ids=[c[0] for c in _every_case()])
def test_the_long_path_gives_libsodiums_verdict_on_every_edge_case(
        monkeypatch: pytest.MonkeyPatch, name: str, key: bytes, signature: bytes, message: bytes) -> None:
    sodium, long_path = _both_paths(monkeypatch, key, signature, message)
    assert long_path is sodium


def test_the_long_path_agrees_on_random_flips_of_good_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(23)
    ident = Identity.generate()
    good = ident.sign(b"a result record")
    for _ in range(300):
        signature, key = bytearray(good), bytearray(ident.public.raw)
        target = rng.choice((signature, key))
        target[rng.randrange(len(target))] ^= 1 << rng.randrange(8)
        sodium, long_path = _both_paths(monkeypatch, bytes(key), bytes(signature), b"a result record")
        assert long_path is sodium


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_a_4_mib_message_verifies_and_one_flipped_bit_does_not(kind: type) -> None:
    ident = Identity.generate()
    data = bytearray(random.Random(4).randbytes(4 << 20))
    signature = ident.sign(bytes(data))
    assert ident.public.verify(signature, kind(bytes(data)))
    data[len(data) // 2] ^= 1
    assert not ident.public.verify(signature, kind(bytes(data)))
    small_order_key = PublicKey(bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000"))
    assert not small_order_key.verify(small_order_key.raw + bytes(32), kind(bytes(data)))   # OpenSSL alone: True


@pytest.mark.parametrize("size", [(64 << 10) - 1, 64 << 10, 4 << 20])
def test_a_long_message_is_signed_to_the_bytes_libsodium_makes(size: int) -> None:
    ident = Identity.generate()
    data = random.Random(size).randbytes(size)
    signature = ident.sign(data)
    assert signature == crypto_sign(data, ident._secret)[:64] == ident._key.sign(data)
    assert ident.public.verify(signature, data)
