"""Federated feature statistics: each site sends sums, never rows.

Site i reports ``n_i``, ``s_i = sum_x x`` and ``q_i = sum_x x*x`` (per feature). The
coordinator forms ``mean = sum s_i / sum n_i`` and
``std = sqrt(max(sum q_i / sum n_i - mean^2, 0))``, with std below ``eps`` replaced by 1
(constant features pass through unscaled).
"""

from __future__ import annotations

import numpy as np


def local_moments(X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, sum, sum of squares)`` over the first axis, in float64."""
    X64 = X.astype(np.float64)
    return len(X), X64.sum(axis=0), (X64 * X64).sum(axis=0)


def pooled_mean_std(counts: list[int], sums: list[np.ndarray], sumsqs: list[np.ndarray],
                    eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of the union of the sites' data, from their moments."""
    n = float(sum(counts))
    if n <= 0:
        raise ValueError("no examples reported")
    mean = np.sum(sums, axis=0) / n
    var = np.maximum(np.sum(sumsqs, axis=0) / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.where(std < eps, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)
