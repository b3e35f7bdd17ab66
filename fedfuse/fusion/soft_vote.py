"""Fusion of the cohort models: weighted soft voting, with weights fitted from the sites'
aggregate statistics only, and the choice between it, a stacking head
(``fedfuse.stacking``) and a distilled student (``fedfuse.distill``).

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


def choose_method(requested: str, briers: dict[str, float]) -> str:
    """The method whose predictor is served, from each available method's validation
    Brier score (``soft_vote`` is always available). ``auto``: the lowest score, a tie
    going to the earlier of soft_vote, stack, distill. A requested method that did not
    run (no site scored it) falls back to ``soft_vote``."""
    if requested == "auto":
        order = [m for m in ("soft_vote", "stack", "distill") if m in briers]
        return min(order, key=lambda m: (briers[m], order.index(m)))
    return requested if requested in briers else "soft_vote"


@dataclass(frozen=True)
class ScoredModel:
    """One model the sites scored like a member: the distilled student (``arch`` is a
    cohort's) or the stacking head (``arch`` is ``stack``). ``A`` and ``b`` are its summed
    Brier statistics over the sites' validation splits."""

    arch: str
    state: dict[str, Any]
    """Its weights (a torch state dict); empty when read back from ``to_dict``."""
    A: float
    b: float
    num_examples: int
    val_brier: float
    test_accuracy: float
    fit: dict[str, Any]
    """How it was fitted (distillation: steps, best_step, holdout_kl, start_kl,
    transfer_examples; stacking: rounds, lr, train_loss per round)."""

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "A": self.A, "b": self.b, "num_examples": self.num_examples,
                "val_brier": self.val_brier, "test_accuracy": self.test_accuracy,
                "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict[str, Any], state: dict[str, Any]) -> ScoredModel:
        return cls(str(d["arch"]), state, float(d["A"]), float(d["b"]),
                   int(d["num_examples"]), float(d["val_brier"]), float(d["test_accuracy"]),
                   dict(d["fit"]))


SCORED = {"stack": "stack", "distill": "student"}
"""Each single-model method -> the FusionResult field (and ``to_dict`` key) holding it."""


@dataclass(frozen=True)
class FusionResult:
    """Soft-vote weights fitted from the sites' summed Brier statistics (A, b, N), the
    soft vote's scores, and the stacking head and distilled student where they were
    made. ``method`` is the one served: ``soft_vote``, ``stack`` or ``distill``."""

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
    student: ScoredModel | None = None
    stack: ScoredModel | None = None

    @property
    def candidates(self) -> dict[str, ScoredModel]:
        """The single-model methods that ran: ``stack`` and ``distill``."""
        found = {m: getattr(self, key) for m, key in SCORED.items()}
        return {m: c for m, c in found.items() if c is not None}

    @property
    def served_model(self) -> ScoredModel | None:
        """The stacking head or the student when it is served, else None (the soft vote
        is)."""
        return self.candidates.get(self.method)

    @property
    def fused_test_accuracy(self) -> float:
        """Test accuracy of the predictor that is served."""
        served = self.served_model
        return self.test_accuracy if served is None else served.test_accuracy

    def with_candidates(self, requested: str, *, student: ScoredModel | None = None,
                        stack: ScoredModel | None = None) -> FusionResult:
        """This result with the given student and head, serving ``requested``'s choice."""
        out = replace(self, student=student or self.student, stack=stack or self.stack)
        briers = {"soft_vote": self.val_brier,
                  **{m: c.val_brier for m, c in out.candidates.items()}}
        return replace(out, method=choose_method(requested, briers))

    def scores(self) -> dict[str, dict[str, Any]]:
        """Every method's validation Brier score and test accuracy, side by side."""
        out: dict[str, dict[str, Any]] = {"soft_vote": {
            "val_brier": self.val_brier, "test_accuracy": self.test_accuracy,
            "weights": dict(zip(self.members, map(float, self.weights)))}}
        if self.stack is not None:
            out["stack"] = {"val_brier": self.stack.val_brier,
                            "test_accuracy": self.stack.test_accuracy,
                            "rounds": self.stack.fit["rounds"]}
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
                "student": None if self.student is None else self.student.to_dict(),
                "stack": None if self.stack is None else self.stack.to_dict()}

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
    def from_dict(cls, d: dict[str, Any], states: dict[str, dict[str, Any]] | None = None
                  ) -> FusionResult:
        """A result read back; ``states`` holds the weights of "student" and "stack"."""
        states = states or {}
        scored = {key: None if d.get(key) is None else
                  ScoredModel.from_dict(d[key], states.get(key, {}))
                  for key in SCORED.values()}
        return cls(d["method"], list(d["members"]), np.asarray(d["weights"]),
                   np.asarray(d["A"]), np.asarray(d["b"]), int(d["num_examples"]),
                   float(d["val_brier"]), float(d["test_accuracy"]), int(d["sites"]),
                   **scored)
