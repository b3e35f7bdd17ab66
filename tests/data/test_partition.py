import numpy as np
import pytest

from fedfuse.data.partition import (
    build_federation,
    label_skew,
    partition_dirichlet,
    partition_iid,
    stratified_groups,
    stratified_holdout,
    train_val_split,
)
from fedfuse.errors import DataError

Y = np.repeat(np.arange(10), 100)  # 1000 labels, 10 balanced classes


def assert_disjoint_complete(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n


def test_iid_is_disjoint_complete_and_balanced():
    parts = partition_iid(1000, 7, seed=0)
    assert_disjoint_complete(parts, 1000)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_disjoint_complete_and_respects_min_samples():
    parts = partition_dirichlet(Y, 12, alpha=0.3, seed=1, min_samples=15)
    assert_disjoint_complete(parts, 1000)
    assert min(len(p) for p in parts) >= 15


def test_skew_grows_as_alpha_falls():
    skews = [np.mean([label_skew(Y, partition_dirichlet(Y, 10, a, seed=s)) for s in range(5)])
             for a in (100.0, 1.0, 0.3, 0.05)]
    assert all(a < b for a, b in zip(skews, skews[1:])), skews
    assert skews[0] < 0.1 and skews[-1] > 0.6
    iid = np.mean([label_skew(Y, partition_iid(1000, 10, seed=s)) for s in range(5)])
    assert iid < skews[1]  # only sampling noise, below Dirichlet(1.0)


def test_same_seed_same_partition_other_seed_differs():
    a = partition_dirichlet(Y, 8, 0.5, seed=4)
    b = partition_dirichlet(Y, 8, 0.5, seed=4)
    c = partition_dirichlet(Y, 8, 0.5, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_fewer_samples_than_clients_is_refused():
    with pytest.raises(DataError, match="fewer than 20 clients"):
        partition_iid(10, 20, seed=0)
    with pytest.raises(DataError, match="fewer than"):
        partition_dirichlet(Y[:30], 10, 0.5, seed=0, min_samples=5)


def test_unreachable_min_samples_is_refused_with_advice():
    with pytest.raises(DataError, match="raise partition.alpha"):
        partition_dirichlet(Y, 50, alpha=0.01, seed=0, min_samples=19)


def test_stratified_holdout_keeps_class_shares():
    rest, hold = stratified_holdout(Y, 0.2, seed=0)
    assert_disjoint_complete([rest, hold], 1000)
    assert np.array_equal(np.bincount(Y[hold]), np.full(10, 20))


def test_train_val_split_and_federation():
    split = train_val_split(np.arange(50), 0.2, seed=0)
    assert len(split.val) == 10 and len(split.train) == 40
    assert_disjoint_complete([split.train, split.val], 50)
    fed = build_federation(Y, [6], method="dirichlet", alpha=0.5, min_samples=10,
                           test_fraction=0.2, val_fraction=0.2, seed=0)
    parts = [fed.test] + [p for c in fed.clients for p in (c.train, c.val)]
    assert_disjoint_complete(parts, 1000)
    assert all(len(c.val) >= 1 and len(c.train) >= 1 for c in fed.clients)


def test_stratified_groups_give_each_group_the_pooled_class_mix():
    groups = stratified_groups(Y, [2, 1, 1], seed=3)
    assert_disjoint_complete(groups, 1000)
    counts = np.array([np.bincount(Y[g], minlength=10) for g in groups])
    assert np.array_equal(counts.sum(0), np.full(10, 100))
    assert np.abs(counts - np.array([[50], [25], [25]])).max() <= 1


def federation_groups(by_group, seed):
    fed = build_federation(Y, [4, 4, 4], method="dirichlet", alpha=0.5, min_samples=10,
                           test_fraction=0.2, val_fraction=0.1, seed=seed, by_group=by_group)
    parts = [np.concatenate([c.train, c.val]) for c in fed.clients]
    assert_disjoint_complete([fed.test] + parts, 1000)
    return parts, [np.concatenate(parts[4 * g:4 * g + 4]) for g in range(3)]


def test_by_group_federation_evens_out_cohorts_and_keeps_the_skew_within_them():
    """Each cohort gets a stratified third of the pool; its clients stay label-skewed."""
    for seed in range(5):
        clients, cohorts = federation_groups(True, seed)
        sizes = [len(c) for c in cohorts]
        assert max(sizes) - min(sizes) <= 10  # 800 examples in thirds, ±1 per class
        assert label_skew(Y, cohorts) < 0.02
        assert label_skew(Y, clients) > 0.3
    mixed = np.mean([label_skew(Y, federation_groups(False, s)[1]) for s in range(5)])
    assert mixed > 0.05  # all clients partitioned together: cohorts inherit the skew


def test_one_group_federation_is_the_plain_partition():
    one = build_federation(Y, [6], method="dirichlet", alpha=0.5, min_samples=10,
                           test_fraction=0.2, val_fraction=0.2, seed=2)
    flat = build_federation(Y, [6], method="dirichlet", alpha=0.5, min_samples=10,
                            test_fraction=0.2, val_fraction=0.2, seed=2, by_group=False)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(one.clients, flat.clients))


def test_a_cohort_whose_share_cannot_be_split_is_named():
    with pytest.raises(DataError, match=r"cohorts\[1\]'s share of the data: could not give"):
        build_federation(Y, [1, 50], method="dirichlet", alpha=0.05, min_samples=15,
                         test_fraction=0.2, val_fraction=0.1, seed=0)
