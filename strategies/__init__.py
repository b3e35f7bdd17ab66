"""Aggregation strategies, importable as ``fedfuse.strategies``."""

from fedfuse.strategies.cohort import (ROBUST_RULES, CohortFedAvg, CohortGrid, CohortStrategy,
                                       cohort_strategy)

__all__ = ["ROBUST_RULES", "CohortFedAvg", "CohortGrid", "CohortStrategy", "cohort_strategy"]
