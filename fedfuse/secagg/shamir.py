"""Shamir secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret s < 2^256 is the constant term of a random polynomial
f(x) = s + a_1 x + ... + a_{t-1} x^{t-1} (a_i uniform in GF(p)); share i is f(i) for
i = 1..n. Any t shares determine s by Lagrange interpolation at 0; fewer than t shares are
consistent with every secret, so they reveal nothing about it.

pycryptodome's Shamir (which Flower's SecAgg+ uses) works in GF(2^128) in pure Python and
took about 60 ms to recombine one 16-byte chunk at n = 100 in a one-off check here; a
coordinator recombines one secret per client per round, so it would cost seconds per
round. In a prime field the Lagrange coefficients of one set of share indices are computed
once and every secret is then t multiplications.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66
"""A share's value f(i) in big-endian bytes (ceil(521 / 8))."""


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Shares f(1), ..., f(n) of the 32-byte ``secret`` with reconstruction threshold t.

    f(x) = s + sum_{k=1}^{t-1} a_k x^k mod p, evaluated by Horner's rule.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"threshold {threshold} must be in 1..{num_shares}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                 for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


@lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for any f of degree < len(xs):
    l_i = prod_{j != i} x_j / (x_j - x_i) mod p."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine_shares(shares: dict[int, bytes]) -> bytes:
    """The secret from shares {i: f(i)}: s = sum_i l_i f(i) mod p (see lagrange_at_zero).

    Raises ValueError when the result cannot be a 32-byte secret (too few or
    inconsistent shares usually give a value of about 521 bits)."""
    if len(set(shares)) != len(shares) or not shares:
        raise ValueError("shares need distinct indices")
    xs = tuple(sorted(shares))
    ys = [int.from_bytes(shares[x], "big") for x in xs]
    s = sum(lam * y for lam, y in zip(lagrange_at_zero(xs), ys)) % PRIME
    if s >= 1 << (8 * SECRET_BYTES):
        raise ValueError("the shares do not combine to a secret")
    return s.to_bytes(SECRET_BYTES, "big")
