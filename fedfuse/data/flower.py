"""Flower Datasets' partitioners (extra ``fedfuse[datasets]``), behind fedfuse's split.

fedfuse still holds out the coordinator's stratified test split, gives each cohort its
stratified share of the pool, and splits each client's part into train and validation;
what Flower Datasets decides is how one cohort's share is dealt over its clients:

- ``pathological``: each client gets ``classes_per_client`` classes (drawn at random),
  each class split evenly among the clients holding it (a class no client drew stays
  unused, with a warning);
- ``shard``: the share sorted by label and cut into shards, ``shards_per_client`` each;
- ``linear``, ``square``, ``exponential``: sizes proportional to ``i``, ``i²``, ``2^i``
  for the i-th client (label-blind);
- ``flower_dirichlet``: Flower's Dirichlet(``alpha``) label skew, redrawn until every
  client holds ``min_samples`` (optionally ``self_balancing``).

The share's rows are shuffled by the seed before partitioning (so the size-based
partitioners, which cut rows in order, draw at random) and every partitioner gets the
seed: the same seed gives the same partition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfuse.errors import DataError

log = logging.getLogger("fedfuse.data")

FLOWER_METHODS = ("pathological", "shard", "linear", "square", "exponential",
                  "flower_dirichlet")


@dataclass(frozen=True)
class FlowerParams:
    """The partitioners' parameters (``[partition]`` keys)."""

    alpha: float = 0.5
    min_samples: int = 10
    classes_per_client: int = 2
    shards_per_client: int = 2
    self_balancing: bool = False


def flower_partition(y: np.ndarray, num_clients: int, method: str, params: FlowerParams,
                     seed: int) -> list[np.ndarray]:
    """The index sets (into ``y``) of the ``num_clients`` parts Flower Datasets'
    ``method`` partitioner makes of labels ``y``."""
    try:
        from datasets import Dataset, disable_progress_bars
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise DataError(f"partition.method {method!r} comes from Flower Datasets: pip "
                        "install 'fedfuse[datasets]'") from None
    disable_progress_bars()
    order = np.random.default_rng(seed).permutation(len(y))
    n, by = num_clients, "label"
    makers: dict[str, Any] = {
        "pathological": lambda: fp.PathologicalPartitioner(
            num_partitions=n, partition_by=by,
            num_classes_per_partition=params.classes_per_client, seed=seed),
        "shard": lambda: fp.ShardPartitioner(
            num_partitions=n, partition_by=by,
            num_shards_per_partition=params.shards_per_client, seed=seed),
        "linear": lambda: fp.LinearPartitioner(num_partitions=n),
        "square": lambda: fp.SquarePartitioner(num_partitions=n),
        "exponential": lambda: fp.ExponentialPartitioner(num_partitions=n),
        "flower_dirichlet": lambda: fp.DirichletPartitioner(
            num_partitions=n, partition_by=by, alpha=params.alpha,
            min_partition_size=params.min_samples, self_balancing=params.self_balancing,
            seed=seed),
    }
    partitioner = makers[method]()
    partitioner.dataset = Dataset.from_dict({by: y[order].tolist(), "row": order.tolist()})
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
                 for i in range(n)]
    except ValueError as exc:
        raise DataError(f"partition.method {method!r} could not deal {len(y)} examples "
                        f"over {n} clients: {exc}") from None
    unused = len(y) - sum(len(p) for p in parts)
    if unused:  # e.g. pathological: classes that no client drew
        log.warning("partition.method %r gave %d of %d examples to no client", method,
                    unused, len(y))
    return parts
