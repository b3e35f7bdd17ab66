"""Fusion of the cohort models: weighted soft voting, with weights fitted from the sites'
aggregate statistics only, and the choice between it and a distilled student.

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

from dataclasses import dataclass, replace
from typing import Any

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


def choose_method(requested: str, soft_vote_brier: float, student_brier: float | None) -> str:
    """The method whose predictor is served: ``soft_vote`` when there is no student;
    for ``auto``, ``distill`` only if the student's validation Brier score is strictly
    lower than the soft vote's; otherwise ``requested``."""
    if student_brier is None:
        return "soft_vote"
    if requested == "auto":
        return "distill" if student_brier < soft_vote_brier else "soft_vote"
    return requested


@dataclass(frozen=True)
class StudentResult:
    """The distilled student (``fedfuse.distill``) and its scores: ``A`` and ``b`` are its
    summed Brier statistics over the sites' validation splits."""

    arch: str
    state: dict[str, Any]
    """Its weights (a torch state dict); empty when read back from ``to_dict``."""
    A: float
    b: float
    num_examples: int
    val_brier: float
    test_accuracy: float
    fit: dict[str, Any]
    """How distillation went: steps, best_step, holdout_kl, start_kl, transfer_examples."""

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "A": self.A, "b": self.b, "num_examples": self.num_examples,
                "val_brier": self.val_brier, "test_accuracy": self.test_accuracy,
                "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict[str, Any], state: dict[str, Any]) -> StudentResult:
        return cls(str(d["arch"]), state, float(d["A"]), float(d["b"]),
                   int(d["num_examples"]), float(d["val_brier"]), float(d["test_accuracy"]),
                   dict(d["fit"]))


@dataclass(frozen=True)
class FusionResult:
    """Soft-vote weights fitted from the sites' summed Brier statistics (A, b, N), the
    soft vote's scores, and the distilled student where there is one. ``method`` is the
    one served: ``soft_vote`` or ``distill``."""

    method: str
    members: list[str]
    weights: np.ndarray
    A: np.ndarray
    b: np.ndarray
    num_examples: int
    val_brier: float
    """The soft vote's mean validation Brier score."""
    test_accuracy: float
    """The soft vote's accuracy on the coordinator's test split."""
    sites: int
    student: StudentResult | None = None

    @property
    def served_student(self) -> StudentResult | None:
        """The student when it is the predictor served, else None (the soft vote is)."""
        return self.student if self.method == "distill" else None

    @property
    def fused_test_accuracy(self) -> float:
        """Test accuracy of the predictor that is served."""
        served = self.served_student
        return self.test_accuracy if served is None else served.test_accuracy

    def with_student(self, student: StudentResult, requested: str) -> FusionResult:
        return replace(self, student=student,
                       method=choose_method(requested, self.val_brier, student.val_brier))

    def scores(self) -> dict[str, dict[str, Any]]:
        """Every method's validation Brier score and test accuracy, side by side."""
        out: dict[str, dict[str, Any]] = {"soft_vote": {
            "val_brier": self.val_brier, "test_accuracy": self.test_accuracy,
            "weights": dict(zip(self.members, map(float, self.weights)))}}
        if self.student is not None:
            out["distill"] = {"val_brier": self.student.val_brier,
                              "test_accuracy": self.student.test_accuracy,
                              "student": self.student.arch,
                              "transfer_examples": self.student.fit["transfer_examples"]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "members": self.members,
                "weights": self.weights.tolist(), "A": self.A.tolist(), "b": self.b.tolist(),
                "num_examples": self.num_examples, "val_brier": self.val_brier,
                "test_accuracy": self.test_accuracy, "sites": self.sites,
                "student": None if self.student is None else self.student.to_dict()}

    @classmethod
    def fit(cls, members: list[str], A: np.ndarray, b: np.ndarray, num_examples: int,
            sites: int, test_probas: list[np.ndarray], test_y: np.ndarray) -> FusionResult:
        """Soft-vote weights from the summed statistics, scored on the coordinator's test
        split (``test_probas[m]``: member m's probabilities there)."""
        weights = fit_simplex_weights(A, b)
        acc = float((fuse_proba(test_probas, weights).argmax(1) == test_y).mean())
        return cls("soft_vote", members, weights, A, b, num_examples,
                   brier_score(A, b, num_examples, weights), acc, sites)

    @classmethod
    def from_dict(cls, d: dict[str, Any],
                  student_state: dict[str, Any] | None = None) -> FusionResult:
        student = d.get("student")
        return cls(d["method"], list(d["members"]), np.asarray(d["weights"]),
                   np.asarray(d["A"]), np.asarray(d["b"]), int(d["num_examples"]),
                   float(d["val_brier"]), float(d["test_accuracy"]), int(d["sites"]),
                   None if student is None else StudentResult.from_dict(student,
                                                                         student_state or {}))
