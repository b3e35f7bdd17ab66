import numpy as np
import pytest

from fedfuse.fusion.soft_vote import brier_score, brier_statistics, fit_simplex_weights, fuse_proba

rng = np.random.default_rng(0)


def random_proba(n, k):
    p = rng.random((n, k)) + 1e-3
    return p / p.sum(1, keepdims=True)


def test_statistics_reproduce_the_brier_score_of_any_weighting():
    y = rng.integers(0, 4, 50)
    probas = [random_proba(50, 4) for _ in range(3)]
    A, b = brier_statistics(probas, y)
    for w in (np.array([1, 0, 0.0]), np.array([0.2, 0.3, 0.5])):
        q = fuse_proba(probas, w)
        direct = ((q - np.eye(4)[y]) ** 2).sum(1).mean()
        assert brier_score(A, b, 50, w) == pytest.approx(direct, rel=1e-10)


def test_site_statistics_add_up_to_the_pooled_statistics():
    y = rng.integers(0, 3, 40)
    probas = [random_proba(40, 3) for _ in range(2)]
    A, b = brier_statistics(probas, y)
    A1, b1 = brier_statistics([p[:15] for p in probas], y[:15])
    A2, b2 = brier_statistics([p[15:] for p in probas], y[15:])
    np.testing.assert_allclose(A1 + A2, A)
    np.testing.assert_allclose(b1 + b2, b)


def test_solver_puts_all_weight_on_a_perfect_member():
    y = rng.integers(0, 3, 100)
    perfect = np.eye(3)[y] * 0.98 + 0.01
    probas = [random_proba(100, 3), perfect, random_proba(100, 3)]
    w = fit_simplex_weights(*brier_statistics(probas, y))
    assert w == pytest.approx([0, 1, 0], abs=1e-6)


def test_solver_finds_the_interior_optimum_on_the_simplex():
    # Members right on disjoint halves: the best mix is an even blend, beating both.
    y = np.array([0] * 50 + [1] * 50)
    a = np.where(y[:, None] == np.arange(2), 0.9, 0.1)
    a[50:] = 0.5
    b_ = np.where(y[:, None] == np.arange(2), 0.9, 0.1)
    b_[:50] = 0.5
    A, b = brier_statistics([a, b_], y)
    w = fit_simplex_weights(A, b)
    assert w == pytest.approx([0.5, 0.5], abs=1e-4)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    grid = [np.array([t, 1 - t]) for t in np.linspace(0, 1, 101)]
    assert brier_score(A, b, 100, w) <= min(brier_score(A, b, 100, g) for g in grid) + 1e-9
