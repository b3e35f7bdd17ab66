"""Aggregation strategies, importable as ``fedfuse.strategies``."""

from fedfuse.strategies.cohort import CohortFedAvg, CohortGrid

__all__ = ["CohortFedAvg", "CohortGrid"]
