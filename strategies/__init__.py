"""Aggregation strategies, importable as ``fedfuse.strategies``: one per module.

- ``cohort``: Flower's FedAvg (and FedAvgM) restricted to one cohort, with its own sampler;
- ``robust``: Flower's robust rules (median, trimmed mean, Krum, Multi-Krum) per cohort;
- ``fedopt``: Flower's FedProx, FedAdam, FedYogi and FedAdagrad per cohort;
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
from .fedopt import SERVER_OPTIMIZERS, CohortFedProx
from .robust import ROBUST_RULES, robust_strategy

__all__ = ["ROBUST_RULES", "SERVER_OPTIMIZERS", "ClientLevelDP", "CohortFedAvg",
           "CohortFedAvgM", "CohortFedProx", "CohortGrid", "CohortStrategy", "GridView",
           "cohort_strategy"]


def cohort_strategy(aggregation: str, cohort: str, members: Sequence[int], *,
                    trim_fraction: float = 0.2, max_malicious: int = 1,
                    multikrum_select: int = 2, server_momentum: float = 0.0,
                    server_lr: float = 1.0, strategy: str = "fedavg",
                    proximal_mu: float = 0.0, fedopt: dict[str, float] | None = None,
                    **strategy_kwargs: Any) -> CohortStrategy:
    """The cohort's strategy for ``aggregation`` (``fedavg`` or a ``ROBUST_RULES`` key):
    Flower's FedAvg, FedAvgM when a server optimiser is set
    (``m <- server_momentum * m + (w - w_avg)``, ``w <- w - server_lr * m``), FedProx
    (``strategy = "fedprox"``, ``proximal_mu``) or a FedOpt rule (``fedadam``, ``fedyogi``,
    ``fedadagrad``, with ``fedopt``'s eta, beta_1, beta_2, tau; ``strategies.fedopt``), or
    the robust rule (``fedfuse.strategies.robust``). ``strategy_kwargs`` go to
    :class:`CohortStrategy` (``seed``, ``fraction_train``, ``fraction_evaluate``) and on to
    Flower's strategy."""
    if strategy == "fedprox":
        return CohortFedProx(cohort, members, proximal_mu=proximal_mu, **strategy_kwargs)
    if strategy in SERVER_OPTIMIZERS:
        takes = ("eta", "tau") if strategy == "fedadagrad" else ("eta", "beta_1", "beta_2",
                                                                 "tau")
        rule: dict[str, Any] = {k: v for k, v in (fedopt or {}).items() if k in takes}
        return SERVER_OPTIMIZERS[strategy](cohort, members, **rule, **strategy_kwargs)
    if aggregation == "fedavg" and (server_momentum > 0.0 or server_lr != 1.0):
        return CohortFedAvgM(cohort, members, server_momentum=server_momentum,
                             server_learning_rate=server_lr, **strategy_kwargs)
    if aggregation == "fedavg":
        return CohortFedAvg(cohort, members, **strategy_kwargs)
    return robust_strategy(aggregation, cohort, members, trim_fraction=trim_fraction,
                           max_malicious=max_malicious, multikrum_select=multikrum_select,
                           **strategy_kwargs)
