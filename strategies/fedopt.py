"""Flower's FedProx and server-optimiser strategies (FedAdam, FedYogi, FedAdagrad)
restricted to one cohort (``strategies.cohort``).

- FedProx is FedAvg whose train config carries ``proximal-mu``: each site adds the step
  of ``mu/2 * ||w - w_global||^2`` to its local training (``train_epochs``).
- FedOpt (Reddi et al. 2021) treats ``Δ = w_avg - w`` as a pseudo-gradient:
  ``m <- β1 m + (1 - β1) Δ``, and ``v`` by the rule (Adam: ``β2 v + (1 - β2) Δ²``;
  Yogi: ``v - (1 - β2) Δ² sign(v - Δ²)``; Adagrad: ``v + Δ²``), then
  ``w <- w + η m / (sqrt(v) + τ)`` (Adam with bias correction). Under secure
  aggregation the average arrives as the cohort's one decoded sum, which is what the
  rule needs. ``m`` and ``v`` are checkpointed, so a resumed run steps on exactly.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedProx, FedYogi

from .cohort import CohortStrategy


class CohortFedProx(CohortStrategy, FedProx):
    """FedProx over one cohort's nodes (the proximal term is the sites')."""


class ServerOptimizerState:
    """Checkpoints a FedOpt strategy's moments ``m_t`` and ``v_t`` (a mixin before the
    cohort strategy)."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state_arrays(self) -> dict[str, np.ndarray]:
        state = super().state_arrays()  # type: ignore[misc]
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name) or {}).items():
                state[f"{name}/{key}"] = np.asarray(value)
        return state

    def restore_state(self, state: dict[str, np.ndarray], arrays: ArrayRecord) -> None:
        super().restore_state(state, arrays)  # type: ignore[misc]
        for name in ("m_t", "v_t"):
            saved = {k.split("/", 1)[1]: v for k, v in state.items()
                     if k.startswith(f"{name}/")}
            setattr(self, name, saved or None)


class CohortFedAdam(ServerOptimizerState, CohortStrategy, FedAdam):
    """FedAdam over one cohort's nodes."""


class CohortFedYogi(ServerOptimizerState, CohortStrategy, FedYogi):
    """FedYogi over one cohort's nodes."""


class CohortFedAdagrad(ServerOptimizerState, CohortStrategy, FedAdagrad):
    """FedAdagrad over one cohort's nodes."""


SERVER_OPTIMIZERS: dict[str, type[CohortStrategy]] = {
    "fedadam": CohortFedAdam, "fedyogi": CohortFedYogi, "fedadagrad": CohortFedAdagrad}
"""The FedOpt strategies by the name ``train.strategy`` gives them."""
