"""A client's update as a vector of integers mod 2^64, so that masked vectors add up.

Layout of one client's vector (all entries uint64, arithmetic mod 2^64):
``[n * q(delta) for every weight, n, fix(n * loss), fix(n * accuracy), clipped]`` where
``delta`` is the client's new weights minus the global weights it received, ``n`` its
number of training examples, ``q`` the stochastic quantiser below and ``fix`` fixed point
with 24 fractional bits. Summed over clients this gives FedAvg's numerator and denominator,
so the coordinator recovers w = w_global + sum_i n_i delta_i / sum_i n_i (up to
quantisation) without seeing any single n_i delta_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfuse.errors import ConfigError

FIXED_POINT_BITS = 24
EXTRAS = 4
"""Entries after the weights: n, n*loss, n*accuracy, clipped coordinates."""


@dataclass(frozen=True)
class Quantizer:
    """Unbiased stochastic quantisation of [-c, c] onto the integers 0..L, L = 2^bits - 1.

    q(x) = floor((clip(x, -c, c) + c) * L / (2c) + U), U ~ Uniform[0, 1), so
    E[q(x)] = (clip(x) + c) * L / (2c) and the error of one value is below one step 2c / L.
    """

    clip_range: float
    bits: int

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Width of one quantisation step, 2c / L: the bound on a dequantised mean's error."""
        return 2.0 * self.clip_range / self.levels

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.clip_range
        scaled = (np.clip(x.astype(np.float64), -c, c) + c) * (self.levels / (2.0 * c))
        return np.floor(scaled + rng.random(scaled.shape)).astype(np.uint64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """x = q * 2c / L - c (q may be a mean of quantised values)."""
        return q * (2.0 * self.clip_range / self.levels) - self.clip_range


def check_ring(bits: int, total_examples: int) -> None:
    """Refuse settings whose sums could wrap around: sum_i n_i q_i < N * 2^bits must stay
    below 2^64 (and below 2^63 for the signed fixed-point extras)."""
    if total_examples * (1 << bits) >= 1 << 63:
        raise ConfigError("secure_aggregation.quantization_bits",
                          f"{bits} bits with {total_examples} training examples could overflow "
                          f"the 64-bit ring; use at most "
                          f"{63 - max(1, total_examples).bit_length()} bits")


def payload_length(sizes: list[int]) -> int:
    """Entries in the vector of an update whose weight arrays have ``sizes`` elements."""
    return sum(sizes) + EXTRAS


def encode_fixed(values: np.ndarray) -> np.ndarray:
    """Fixed point in the ring: round(v * 2^24) as int64, read as uint64 (two's
    complement, so sums of negative values come out right)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("fixed-point values must be finite")
    return np.round(values * (1 << FIXED_POINT_BITS)).astype(np.int64).view(np.uint64)


def decode_fixed(total: np.ndarray) -> np.ndarray:
    """The float values of a sum of ``encode_fixed`` vectors: int64(total) / 2^24."""
    return total.view(np.int64).astype(np.float64) / (1 << FIXED_POINT_BITS)


def encode_update(delta: list[np.ndarray], num_examples: int, loss: float, accuracy: float,
                  quantizer: Quantizer, rng: np.random.Generator) -> np.ndarray:
    """One client's vector (layout in the module docstring)."""
    flat = np.concatenate([d.ravel() for d in delta]) if delta else np.zeros(0)
    if not np.all(np.isfinite(flat)):
        raise ValueError("the update has non-finite values")
    clipped = int(np.count_nonzero(np.abs(flat) > quantizer.clip_range))
    n = np.uint64(num_examples)
    sums = encode_fixed(np.array([num_examples * loss, num_examples * accuracy]))
    extras = np.concatenate([[n], sums, [np.uint64(clipped)]]).astype(np.uint64)
    return np.concatenate([quantizer.quantize(flat, rng) * n, extras])


@dataclass(frozen=True)
class UpdateSum:
    """What the coordinator learns from a secure sum of update vectors."""

    mean_delta: list[np.ndarray]
    """sum_i n_i delta_i / sum_i n_i, per weight array."""
    num_examples: int
    loss: float
    """Example-weighted mean training loss."""
    accuracy: float
    clipped: int
    """Coordinates clipped to the quantiser's range, over all clients."""


def decode_sum(total: np.ndarray, shapes: list[tuple[int, ...]],
               quantizer: Quantizer) -> UpdateSum:
    """The FedAvg mean from the sum of client vectors: mean q = sum_i n_i q_i / sum_i n_i,
    dequantised; the extras divided by sum_i n_i.

    Range-checked, since one client can add anything to the sum: every weight entry
    must lie in [0, N L] (each honest n_i q_i lies in [0, n_i L], N = sum_i n_i), so each
    coordinate of the mean delta lies in [-clip_range, clip_range]; the mean accuracy in
    [0, 1], the mean loss >= 0 and the clipped count in [0, N * coordinates]. A sum
    outside them raises ValueError naming the entry: a client sent a dishonest vector."""
    sizes = [int(np.prod(s)) for s in shapes]
    if total.shape != (payload_length(sizes),):
        raise ValueError(f"sum has {total.size} entries, expected {payload_length(sizes)}")
    n = int(total[-EXTRAS])
    if n <= 0:
        raise ValueError("the sum holds no training examples")
    weights = total[:-EXTRAS]
    if n * quantizer.levels >= 1 << 63:
        raise ValueError(f"the sum counts {n} training examples, more than the ring holds")
    bound = np.uint64(n * quantizer.levels)
    if np.any(weights > bound):
        first = int(np.argmax(weights > bound))
        raise ValueError(f"entry {first} of the sum is {int(weights[first])}, beyond the "
                         f"{int(bound)} that {n} examples' quantised updates can reach")
    mean = quantizer.dequantize(weights.astype(np.float64) / n)
    parts = np.split(mean, np.cumsum(sizes)[:-1]) if sizes else []
    loss, accuracy = (float(v / n) for v in decode_fixed(total[-EXTRAS + 1:-1]))
    slack = 1e-6  # fixed-point rounding of the clients' n_i * loss, n_i * accuracy
    if not (loss >= -slack and -slack <= accuracy <= 1 + slack):
        raise ValueError(f"the mean training loss {loss:.4g} or accuracy {accuracy:.4g} is "
                         "out of range")
    clipped = int(total[-1])
    if clipped > n * sum(sizes):
        raise ValueError(f"{clipped} clipped coordinates is more than {n} examples' clients "
                         "could clip")
    return UpdateSum([p.reshape(s) for p, s in zip(parts, shapes)], n, loss, accuracy,
                     clipped)
