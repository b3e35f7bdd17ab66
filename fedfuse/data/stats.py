"""Federated feature statistics: each site sends sums, never rows.

Site i reports ``n_i``, ``s_i = sum_x x`` and ``q_i = sum_x x*x`` (per feature). The
coordinator forms ``mean = sum s_i / sum n_i`` and
``std = sqrt(max(sum q_i / sum n_i - mean^2, 0))``, with std below ``eps`` replaced by 1
(constant features pass through unscaled).

Under secure aggregation only the totals leave the sites: site i masks
``[n_i, sum_x z, sum_x z*z]`` with ``z = clip((x - c) / h, -B, B)`` for the reference
centre ``c`` and scale ``h`` the coordinator sends (``standardised_sums``), and from the
totals ``N, S1, S2``: ``mean = c + h S1 / N``, ``var = h^2 (S2 / N - (S1 / N)^2)``
(``mean_std_from_totals``).

For images (C, H, W), ``by_channel`` pools each channel's pixels into one mean and std
(:func:`spread`), as image models are normalised: per-pixel statistics would scale a
pixel that is almost always blank by its tiny spread, so one stroke through it becomes
an outlier that dominates the clipped gradients of DP-SGD.
"""

from __future__ import annotations

import numpy as np


def local_moments(X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, sum, sum of squares)`` over the first axis, in float64."""
    X64 = X.astype(np.float64)
    return len(X), X64.sum(axis=0), (X64 * X64).sum(axis=0)


def pooled_mean_std(counts: list[int], sums: list[np.ndarray], sumsqs: list[np.ndarray],
                    eps: float = 1e-6, by_channel: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of the union of the sites' data, from their moments."""
    n = float(sum(counts))
    if n <= 0:
        raise ValueError("no examples reported")
    mean = np.sum(sums, axis=0) / n
    var = np.maximum(np.sum(sumsqs, axis=0) / n - mean * mean, 0.0)
    return spread(mean, var, eps, by_channel)


def spread(mean: np.ndarray, var: np.ndarray, eps: float, by_channel: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` as float32 of ``mean``'s shape, std below ``eps`` replaced by 1.
    With ``by_channel`` (``mean`` of shape (C, H, W)), every pixel of channel c gets the
    channel's ``m_c = avg_p m_p`` and ``v_c = avg_p (v_p + m_p^2) - m_c^2`` (the pooled
    moments of all its pixels)."""
    if by_channel:
        axes = tuple(range(1, mean.ndim))
        m_c = mean.mean(axis=axes, keepdims=True)
        v_c = np.maximum((var + mean * mean).mean(axis=axes, keepdims=True) - m_c * m_c, 0.0)
        mean, var = np.broadcast_to(m_c, mean.shape), np.broadcast_to(v_c, mean.shape)
    std = np.sqrt(var)
    std = np.where(std < eps, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def standardised_sums(X: np.ndarray, center: np.ndarray, scale: np.ndarray,
                      bound: float) -> np.ndarray:
    """``[n, sum z, sum z*z]`` (flattened) of ``z = clip((x - center) / scale, -bound,
    bound)`` over the rows of ``X``, in float64."""
    z = np.clip((X.astype(np.float64) - center) / scale, -bound, bound)
    return np.concatenate([[float(len(X))], z.sum(axis=0).ravel(), (z * z).sum(axis=0).ravel()])


def mean_std_from_totals(totals: np.ndarray, center: np.ndarray, scale: np.ndarray,
                         bound: float, expected: int, eps: float = 1e-6,
                         by_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std from the summed ``standardised_sums`` of every site, checked: the
    count N must be ``expected`` (the sites' reported counts), and the sums possible
    for N clipped values, |S1| <= N B, 0 <= S2 <= N B^2 and S2 >= S1^2 / N (a variance
    is not negative), up to the fixed point's rounding. Raises ValueError naming what
    is wrong."""
    d = center.size
    if totals.shape != (1 + 2 * d,) or not np.all(np.isfinite(totals)):
        raise ValueError("the totals are not finite numbers of the right length")
    n, s1, s2 = totals[0], totals[1:1 + d], totals[1 + d:]
    if abs(n - expected) > 1e-3:
        raise ValueError(f"they count {n:.6g} examples, the sites reported {expected}")
    slack = 1e-4 * (1.0 + n)
    if np.any(np.abs(s1) > n * bound + slack) or np.any(s2 < -slack) \
            or np.any(s2 > n * bound * bound + slack):
        raise ValueError(f"sums outside what {expected} values clipped to ±{bound:g} give")
    if np.any(s2 < s1 * s1 / n - slack):
        raise ValueError("sums with a negative variance")
    m1 = s1 / n
    var = np.maximum(s2 / n - m1 * m1, 0.0) * scale.ravel() ** 2
    mean = center.ravel() + scale.ravel() * m1
    return spread(mean.reshape(center.shape), var.reshape(center.shape), eps, by_channel)
