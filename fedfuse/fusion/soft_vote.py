"""Weighted soft voting of the cohort models, with weights fitted from the sites'
aggregate statistics only (pure math).

For M members with class probabilities ``p_m(x)`` (vectors over K classes), the fused
predictor is ``q_w(x) = sum_m w_m p_m(x)`` with ``w`` on the simplex (``w >= 0``,
``sum w = 1``). The weights minimise the Brier score over all sites' validation data:

    B(w) = sum_i || q_w(x_i) - e_{y_i} ||^2 = w^T A w - 2 b^T w + N
    A[m, m'] = sum_i <p_m(x_i), p_m'(x_i)>,   b[m] = sum_i p_m(x_i)[y_i]

``A`` and ``b`` are sums over examples, so each site sends its own ``(A_s, b_s, N_s)``
once and the coordinator adds them up (a secure-aggregation-friendly sum). The Brier
score is a proper scoring rule like the log-loss, and unlike the log-loss it has these
exact sufficient statistics, so fitting needs one round trip instead of iterative
federated optimisation.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def brier_statistics(probas: list[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` for members' probabilities ``probas[m]`` of shape (n, K) and labels ``y``."""
    P = np.stack(probas).astype(np.float64)  # (M, n, K)
    A = np.einsum("mik,lik->ml", P, P)
    b = P[:, np.arange(len(y)), y].sum(axis=1)
    return A, b


def fit_simplex_weights(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_w w^T A w - 2 b^T w`` subject to ``w >= 0`` and ``sum w = 1`` (SLSQP)."""
    m = len(b)
    if m == 1:
        return np.ones(1)
    scale = max(float(np.abs(A).max()), 1e-12)  # objective in O(1) units for the solver
    As, bs = A / scale, b / scale
    res = minimize(lambda w: w @ As @ w - 2 * bs @ w, np.full(m, 1.0 / m),
                   jac=lambda w: 2 * (As @ w) - 2 * bs, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def brier_score(A: np.ndarray, b: np.ndarray, n: float, w: np.ndarray) -> float:
    """Mean Brier score ``B(w) / N`` of the fused predictor, from the statistics alone."""
    return float((w @ A @ w - 2 * b @ w + n) / n)


def fuse_proba(probas: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``q = sum_m w_m p_m``, shape (n, K)."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(probas), axes=1)


def member_briers(A: np.ndarray, b: np.ndarray, n: float) -> np.ndarray:
    """Each member's own mean Brier score, ``B(e_m) / N = (A[m, m] - 2 b[m] + N) / N``."""
    return (np.diag(A) - 2 * b + n) / n
