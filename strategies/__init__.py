"""Aggregation strategies, importable as ``fedfuse.strategies``: one per module.

- ``cohort``: Flower's FedAvg (and FedAvgM) restricted to one cohort, with its own sampler;
- ``robust``: Flower's robust rules (median, trimmed mean, Krum, Multi-Krum) per cohort;
- ``client_dp``: client-level DP as a wrapper around a cohort's strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .client_dp import ClientLevelDP
from .cohort import (
    CohortFedAvg,
    CohortFedAvgM,
    CohortGrid,
    CohortStrategy,
    GridView,
)
from .robust import ROBUST_RULES, robust_strategy

__all__ = ["ROBUST_RULES", "ClientLevelDP", "CohortFedAvg", "CohortFedAvgM", "CohortGrid",
           "CohortStrategy", "GridView", "cohort_strategy"]


def cohort_strategy(aggregation: str, cohort: str, members: Sequence[int], *,
                    trim_fraction: float = 0.2, max_malicious: int = 1,
                    multikrum_select: int = 2, server_momentum: float = 0.0,
                    server_lr: float = 1.0, **strategy_kwargs: Any) -> CohortStrategy:
    """The cohort's strategy for ``aggregation`` (``fedavg`` or a ``ROBUST_RULES`` key):
    Flower's FedAvg, FedAvgM when a server optimiser is set
    (``m <- server_momentum * m + (w - w_avg)``, ``w <- w - server_lr * m``), or the
    robust rule (``fedfuse.strategies.robust``). ``strategy_kwargs`` go to
    :class:`CohortStrategy` (``seed``, ``fraction_train``, ``fraction_evaluate``) and on to
    Flower's strategy."""
    if aggregation == "fedavg" and (server_momentum > 0.0 or server_lr != 1.0):
        return CohortFedAvgM(cohort, members, server_momentum=server_momentum,
                             server_learning_rate=server_lr, **strategy_kwargs)
    if aggregation == "fedavg":
        return CohortFedAvg(cohort, members, **strategy_kwargs)
    return robust_strategy(aggregation, cohort, members, trim_fraction=trim_fraction,
                           max_malicious=max_malicious, multikrum_select=multikrum_select,
                           **strategy_kwargs)
