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


def test_by_channel_pools_every_pixel_of_a_channel():
    """Images: one mean and std per channel, equal to those of all the channel's pixels
    of the union (what image models normalise with), broadcast to the input's shape."""
    rng = np.random.default_rng(2)
    parts = [rng.uniform(0, 1 + c, size=(15 + 5 * c, 2, 4, 4)) for c in range(3)]
    for p in parts:
        p[:, :, 0, 0] = 0.0  # a pixel that is always blank: per pixel its std would be 1
    mean, std = pooled_mean_std(*map(list, zip(*map(local_moments, parts))), by_channel=True)
    union = np.concatenate(parts)
    assert mean.shape == std.shape == (2, 4, 4)
    for c in range(2):
        np.testing.assert_allclose(mean[c], union[:, c].mean(), rtol=1e-5)
        np.testing.assert_allclose(std[c], union[:, c].std(), rtol=1e-5)


def test_channel_standardisation_needs_images():
    import pytest

    from fedfuse.config import config_from_dict
    from fedfuse.errors import ConfigError

    cfg = config_from_dict({"name": "t", "cohorts": [{"arch": "mlp", "clients": 3}],
                            "data": {"standardize": "channel"}})
    assert cfg.data.by_channel(True)
    with pytest.raises(ConfigError, match="data.standardize: \"channel\" needs image"):
        cfg.data.by_channel(False)
    assert not config_from_dict({"name": "t", "cohorts": [{"arch": "mlp", "clients": 3}]}
                                ).data.by_channel(False)
