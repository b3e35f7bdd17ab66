import numpy as np

from fedfuse.data.stats import local_moments, pooled_mean_std


def test_pooled_moments_equal_statistics_of_the_union():
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc=i, scale=1 + i, size=(20 + 7 * i, 5)) for i in range(4)]
    parts[0][:, 2] = 3.0
    for p in parts:
        p[:, 4] = 1.5  # a constant feature
    moments = [local_moments(p) for p in parts]
    mean, std = pooled_mean_std(*map(list, zip(*moments)))
    union = np.concatenate(parts)
    np.testing.assert_allclose(mean, union.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:4], union.std(0)[:4], rtol=1e-5)
    assert std[4] == 1.0
