"""Flower's robust aggregation rules, each restricted to one cohort (``CohortStrategy``).

- ``median``: coordinate-wise median of the updates;
- ``trimmed_mean``: per coordinate, the mean after cutting ``trim_fraction`` of the
  values from each end;
- ``krum`` / ``multikrum``: the update(s) with the smallest summed squared distance to
  their n - f - 2 nearest neighbours (f = ``max_malicious``); Multi-Krum averages the
  ``multikrum_select`` best.

They need every client's update in plaintext, so the scenario refuses them with
secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from .cohort import CohortStrategy

ROBUST_RULES: dict[str, type[FedAvg]] = {
    "median": FedMedian, "trimmed_mean": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum}
"""Flower's robust aggregation rules by config name (all FedAvg subclasses)."""


def robust_strategy(rule: str, cohort: str, members: Sequence[int], *,
                    trim_fraction: float = 0.2, max_malicious: int = 1,
                    multikrum_select: int = 2, **strategy_kwargs: Any) -> CohortStrategy:
    """The cohort's strategy for the robust ``rule`` (a ``ROBUST_RULES`` key)."""
    base = ROBUST_RULES[rule]
    settings: dict[str, dict[str, Any]] = {
        "trimmed_mean": {"beta": trim_fraction},
        "krum": {"num_malicious_nodes": max_malicious},
        "multikrum": {"num_malicious_nodes": max_malicious,
                      "num_nodes_to_select": multikrum_select},
    }
    extra = settings.get(rule, {})
    cls = type(f"Cohort{base.__name__}", (CohortStrategy, base), {})
    strategy: CohortStrategy = cls(cohort, members, **strategy_kwargs, **extra)
    return strategy
