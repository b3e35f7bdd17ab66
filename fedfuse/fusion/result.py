"""The outcome of fusion: the soft vote's fitted weights and scores, the stacking head
and distilled student where they were made (each scored by the sites like a member),
and the choice of the one to serve (the lowest validation Brier score for ``auto``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedfuse.fusion.soft_vote import brier_score, fit_simplex_weights, fuse_proba


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
