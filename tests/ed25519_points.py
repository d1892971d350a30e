"""Plain-Python edwards25519 arithmetic, only to BUILD hostile signatures for tests/test_signature_rules.py (small-
and mixed-order keys and R, non-canonical encodings, S >= L) that no honest signer makes. Slow (ms per scalar
multiplication) and not constant time: never for signing anything real. Formulas: RFC 8032, section 5.1."""

from __future__ import annotations

import hashlib

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

Point = tuple[int, int, int, int]   # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z

IDENTITY: Point = (0, 1, 1, 0)


def add(a: Point, b: Point) -> Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % P
    bb = (y1 + x1) * (y2 + x2) % P
    cc = 2 * t1 * t2 * D % P
    dd = 2 * z1 * z2 % P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def neg(a: Point) -> Point:
    x, y, z, t = a
    return (-x % P, y, z, -t % P)


def mul(k: int, a: Point) -> Point:
    out = IDENTITY
    while k > 0:
        if k & 1:
            out = add(out, a)
        a = add(a, a)
        k >>= 1
    return out


def equal(a: Point, b: Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


def encode(a: Point) -> bytes:
    x, y, z, _ = a
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def decode(s: bytes) -> Point | None:
    """Lenient, as ref10 and OpenSSL read a key: y taken mod p (a non-canonical y >= p is accepted), the sign bit
    of x = 0 ignored. None: not on the curve."""
    n = int.from_bytes(s, "little")
    y, sign = (n & ((1 << 255) - 1)) % P, n >> 255
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if (v * x * x - u) % P != 0:
        x = x * SQRT_M1 % P
        if (v * x * x - u) % P != 0:
            return None
    if x & 1 != sign:
        x = -x % P
    return (x, y, 1, x * y % P)


_BY = 4 * pow(5, P - 2, P) % P
BASE = decode(_BY.to_bytes(32, "little"))
assert BASE is not None
B: Point = BASE

#: a point of order 8 (c7176a70...ac037a); its multiples are the whole torsion subgroup, T8[k] = k * T8[1]
_T = decode(bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"))
assert _T is not None
T8: list[Point] = [mul(k, _T) for k in range(8)]


def challenge(r: bytes, a: bytes, message: bytes) -> int:
    """h = SHA-512(R || A || M) mod L, over the ENCODINGS given (what both libraries hash)."""
    return int.from_bytes(hashlib.sha512(r + a + message).digest(), "little") % L


def cofactorless_holds(r: bytes, a: bytes, s: int, message: bytes) -> bool:
    """[S]B - [h]A encodes to exactly R's bytes (both libraries' equation, before their own extra rules)."""
    point = decode(a)
    return point is not None and encode(add(mul(s, B), neg(mul(challenge(r, a, message), point)))) == r


def non_canonical(s: bytes) -> bytes | None:
    """The other encoding of the same y (y + p), where one fits 255 bits (y < 19), with the same sign bit."""
    n = int.from_bytes(s, "little")
    y = n & ((1 << 255) - 1)
    return None if y >= 19 else (n + P).to_bytes(32, "little")
