"""Shamir secret sharing over the prime field GF(p), p = 2^31 - 1 (a Mersenne prime),
one chunk of the secret at a time.

A 32-byte secret is cut into C = 11 big-endian chunks of 3 bytes (the last one of 2), so
every chunk s_c < 2^24 < p. Each chunk has its own random polynomial
f_c(x) = s_c + a_{c,1} x + ... + a_{c,t-1} x^{t-1} (every a uniform in GF(p)); share i is
(f_1(i), ..., f_C(i)) for i = 1..n, 4 big-endian bytes per chunk. Any t shares determine
every chunk by Lagrange interpolation at 0. Fewer than t shares are consistent with every
value of every chunk, and the chunks' polynomials are independent, so they reveal nothing
about the secret: the field's size does not enter the argument, only p > n.

All shares of all chunks are evaluated at once, Horner's rule on a numpy uint64 array
(y < p and x < p keep y x + a below 2^63); the coordinator's recombination is one
weighted sum with Lagrange coefficients computed once per set of share indices. A
521-bit field with Python integers (this module's first version) made splitting the
two secrets cost as much as a third of a client's key agreements at n = 100.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

PRIME = 2**31 - 1
SECRET_BYTES = 32
CHUNK_BYTES = 3
CHUNKS = -(-SECRET_BYTES // CHUNK_BYTES)
WORD_BYTES = 4
SHARE_BYTES = CHUNKS * WORD_BYTES
"""A share: f_c(i) for every chunk c, 4 big-endian bytes each."""


def _chunks(secret: bytes) -> np.ndarray:
    """The secret's chunks s_1..s_C as field elements."""
    return np.array([int.from_bytes(secret[i:i + CHUNK_BYTES], "big")
                     for i in range(0, SECRET_BYTES, CHUNK_BYTES)], dtype=np.uint64)


def _uniform(shape: tuple[int, ...]) -> np.ndarray:
    """Elements uniform in GF(p) from the OS's CSPRNG: 31 random bits, resampled in the
    one case (value p) that falls outside the field."""
    count = int(np.prod(shape))
    out = np.frombuffer(os.urandom(WORD_BYTES * count), dtype="<u4").astype(np.uint64)
    out &= np.uint64(PRIME)
    while np.any(bad := out == PRIME):
        out[bad] = np.frombuffer(os.urandom(WORD_BYTES * int(bad.sum())),
                                 dtype="<u4").astype(np.uint64) & np.uint64(PRIME)
    return out.reshape(shape)


def split_secrets(secrets: list[bytes], threshold: int, num_shares: int) -> list[list[bytes]]:
    """For each 32-byte secret, its shares f(1), ..., f(n) with reconstruction threshold
    t (all secrets in one pass: numpy's cost here is per operation, not per element).

    f_c(x) = s_c + sum_{k=1}^{t-1} a_{c,k} x^k mod p for every chunk c of every secret,
    by Horner's rule, each with its own coefficients.
    """
    if any(len(secret) != SECRET_BYTES for secret in secrets):
        raise ValueError(f"a secret is {SECRET_BYTES} bytes")
    if not 1 <= threshold <= num_shares < PRIME:
        raise ValueError(f"threshold {threshold} must be in 1..{num_shares}")
    width = CHUNKS * len(secrets)
    coeffs = _uniform((threshold - 1, width))
    xs = np.arange(1, num_shares + 1, dtype=np.uint64)[:, None]
    p = np.uint64(PRIME)
    y = np.zeros((num_shares, width), dtype=np.uint64)
    for a in coeffs[::-1]:
        y = (y + a) * xs % p
    y = (y + np.concatenate([_chunks(secret) for secret in secrets])) % p
    rows = y.astype(">u4").tobytes()
    return [[rows[(i * len(secrets) + k) * SHARE_BYTES:(i * len(secrets) + k + 1) * SHARE_BYTES]
             for i in range(num_shares)] for k in range(len(secrets))]


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
    """The secret from shares {i: f(i)}: s_c = sum_i l_i f_c(i) mod p for every chunk
    (see lagrange_at_zero).

    Raises ValueError when a share is malformed, or when the result cannot be a secret:
    with too few or inconsistent shares every chunk is uniform in GF(p), and all eleven
    fall below their chunk's bound (2^24, the last 2^16) with probability 2^-85."""
    if len(set(shares)) != len(shares) or not shares:
        raise ValueError("shares need distinct indices")
    if any(not 0 < x < PRIME for x in shares):
        raise ValueError(f"share indices must be in 1..{PRIME - 1}")
    if any(len(share) != SHARE_BYTES for share in shares.values()):
        raise ValueError(f"a share is {SHARE_BYTES} bytes")
    xs = tuple(sorted(shares))
    ys = np.frombuffer(b"".join(shares[x] for x in xs), dtype=">u4").astype(np.uint64)
    ys = ys.reshape(len(xs), CHUNKS)
    if np.any(ys >= PRIME):
        raise ValueError("a share is not in the field")
    lam = np.array(lagrange_at_zero(xs), dtype=np.uint64)[:, None]
    chunks = [int(c) for c in (lam * ys % np.uint64(PRIME)).sum(axis=0) % np.uint64(PRIME)]
    last = SECRET_BYTES - CHUNK_BYTES * (CHUNKS - 1)
    widths = [CHUNK_BYTES] * (CHUNKS - 1) + [last]
    if any(c >= 1 << (8 * w) for c, w in zip(chunks, widths)):
        raise ValueError("the shares do not combine to a secret")
    return b"".join(c.to_bytes(w, "big") for c, w in zip(chunks, widths))
