"""Splitting a data set into a coordinator test split and per-client train/validation splits.

All functions are pure given their ``seed``: the same seed gives the same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedfuse.data.flower import FlowerParams, flower_partition
from fedfuse.errors import DataError

MAX_DIRICHLET_TRIES = 1000


@dataclass(frozen=True)
class ClientSplit:
    train: np.ndarray
    val: np.ndarray


@dataclass(frozen=True)
class Federation:
    """Index sets into one data set: the coordinator's test split and each client's split."""

    test: np.ndarray
    clients: tuple[ClientSplit, ...]


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, holdout), holding out ``round(fraction * n_k)`` of each
    class k."""
    rng = np.random.default_rng(seed)
    rest, hold = [], []
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        n_hold = int(round(fraction * len(idx)))
        hold.append(idx[:n_hold])
        rest.append(idx[n_hold:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(hold))


def partition_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle 0..n-1 and deal it into ``num_clients`` parts whose sizes differ by at most 1."""
    _check_enough(n, num_clients, 1)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(y: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_samples: int = 1) -> list[np.ndarray]:
    """Label-skewed split: for each class k, client shares p_k ~ Dirichlet(alpha * 1_C).

    Class k's examples are shuffled and cut at the cumulative shares ``cumsum(p_k) * n_k``.
    The draw is repeated (same seed stream) until every client holds ``min_samples``;
    smaller ``alpha`` concentrates each class on fewer clients.
    """
    _check_enough(len(y), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in classes:
            idx = rng.permutation(np.flatnonzero(y == k))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_samples:
            return merged
    raise DataError(f"could not give each of {num_clients} clients at least {min_samples} "
                    f"examples from {len(y)} with Dirichlet alpha={alpha} in "
                    f"{MAX_DIRICHLET_TRIES} draws; raise partition.alpha, lower "
                    "partition.min_samples or use fewer clients")


def train_val_split(idx: np.ndarray, val_fraction: float, seed: int) -> ClientSplit:
    """Shuffle a client's indices; ``max(1, round(val_fraction * n))`` go to validation."""
    perm = np.random.default_rng(seed).permutation(idx)
    n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
    return ClientSplit(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]))


def stratified_groups(y: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Deal each class over groups in proportion to ``sizes``: group g gets about
    ``n_k · s_g / Σ s`` of class k's examples (cut at the cumulative proportions of each
    class's shuffled indices), so every group has the pooled class mix."""
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(sizes)[:-1] / float(sum(sizes))
    groups: list[list[np.ndarray]] = [[] for _ in sizes]
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        for g, chunk in enumerate(np.split(idx, (bounds * len(idx)).round().astype(int))):
            groups[g].append(chunk)
    return [np.sort(np.concatenate(g)) for g in groups]


def build_federation(y: np.ndarray, groups: Sequence[int], *, method: str, alpha: float,
                     min_samples: int, test_fraction: float, val_fraction: float,
                     seed: int, by_group: bool = True,
                     flower: FlowerParams | None = None) -> Federation:
    """Hold out a stratified test split, partition the rest, split each part into train/val.

    ``groups`` holds the number of clients of each group (cohort), clients numbered group
    by group. With ``by_group`` every group first receives a stratified share of the pool
    in proportion to its clients (:func:`stratified_groups`), and the label skew is drawn
    within it; otherwise all clients are partitioned together, so a group's data is
    whatever its clients happen to draw. ``method`` is ``iid``, ``dirichlet`` or one of
    Flower Datasets' (:data:`~fedfuse.data.flower.FLOWER_METHODS`, with ``flower``'s
    parameters).
    """
    pool, test = stratified_holdout(y, test_fraction, seed)
    _check_enough(len(pool), sum(groups), min_samples)
    y_pool = y[pool]
    sizes = list(groups) if by_group else [sum(groups)]  # without by_group: one group
    parts: list[np.ndarray] = []
    for g, (share, n_clients) in enumerate(zip(stratified_groups(y_pool, sizes, seed + 1),
                                               sizes)):
        group_seed = seed + 1 + 1000 * g
        try:
            if method == "iid":
                local = partition_iid(len(share), n_clients, group_seed)
            elif method == "dirichlet":
                local = partition_dirichlet(y_pool[share], n_clients, alpha, group_seed,
                                            min_samples)
            else:
                local = flower_partition(y_pool[share], n_clients, method,
                                         flower or FlowerParams(alpha, min_samples),
                                         group_seed)
        except DataError as exc:
            raise DataError(f"cohorts[{g}]'s share of the data: {exc}" if by_group
                            else str(exc)) from None
        parts.extend(share[p] for p in local)
    if min(len(p) for p in parts) < min_samples:
        raise DataError(f"{len(pool)} training examples cannot give {sum(groups)} clients "
                        f"{min_samples} each (partition.min_samples)")
    clients = tuple(train_val_split(pool[p], val_fraction, seed + 2 + i)
                    for i, p in enumerate(parts))
    return Federation(test=test, clients=clients)


def label_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label distribution and the pooled one.

    ``skew = (1/C) * sum_c 0.5 * || p_c - p ||_1``; 0 for identical distributions, near 1
    when each client holds a single class of many.
    """
    classes = np.unique(y)
    pooled = np.array([(y == k).mean() for k in classes])
    dists = [np.array([(y[p] == k).mean() for k in classes]) for p in parts if len(p)]
    return float(np.mean([0.5 * np.abs(d - pooled).sum() for d in dists]))


def _check_enough(n: int, num_clients: int, min_samples: int) -> None:
    if n < num_clients * min_samples:
        raise DataError(f"{n} training examples are fewer than {num_clients} clients x "
                        f"{min_samples} examples each; use fewer clients or more data")
