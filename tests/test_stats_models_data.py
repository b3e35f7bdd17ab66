import numpy as np
import pytest
import torch

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError, DataError
from fedfuse.models.registry import REGISTRY, build_model, check_compatible, set_standardization
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


@pytest.mark.parametrize("source, shape, classes", [("digits", (1, 8, 8), 10),
                                                    ("breast_cancer", (30,), 2)])
def test_embedded_data_sets(source, shape, classes):
    ds = load_dataset(DataConfig(source=source))
    assert ds.X.dtype == np.float32 and ds.X.shape[1:] == shape
    assert ds.schema.num_classes == classes and set(np.unique(ds.y)) == set(range(classes))


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_architecture_maps_digits_to_class_logits(arch):
    schema = load_dataset(DataConfig()).schema
    model = build_model(arch, schema, seed=0)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_standardize_layer_is_part_of_the_model():
    schema = load_dataset(DataConfig()).schema
    model = build_model("logreg", schema, seed=0)
    set_standardization(model, np.full((1, 8, 8), 2.0), np.full((1, 8, 8), 4.0))
    x = torch.full((1, 1, 8, 8), 6.0)
    assert torch.allclose(model[0](x), torch.ones_like(x))
    assert {"0.mean", "0.std"} <= set(model.state_dict())


def test_architecture_checks():
    tab = load_dataset(DataConfig(source="breast_cancer")).schema
    with pytest.raises(ConfigError, match="needs image-shaped input"):
        check_compatible("cnn", tab, key="cohorts[0].arch")
    with pytest.raises(ConfigError, match="unknown architecture 'resnet'"):
        check_compatible("resnet", tab)
    check_compatible("mlp", tab)


def test_csv_and_npz_files(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,b,diagnosis\n1,2,yes\n3,4,no\n5,6,yes\n")
    ds = load_dataset(DataConfig(source=str(csv), label_column="diagnosis"))
    assert ds.X.shape == (3, 2) and list(ds.y) == [1, 0, 1]
    assert ds.schema.feature_names == ("a", "b") and ds.schema.class_labels == ("no", "yes")
    with pytest.raises(DataError, match="label column 'label' not found"):
        load_dataset(DataConfig(source=str(csv)))
    npz = tmp_path / "d.npz"
    np.savez(npz, X=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    assert load_dataset(DataConfig(source=str(npz))).X.shape == (4, 3)
    np.savez(npz, X=np.ones((4, 3)), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_dataset(DataConfig(source=str(npz)))
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(DataConfig(source=str(tmp_path / "none.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\nx,1\n")
    with pytest.raises(DataError, match="bad.csv:2: a feature value is not a number"):
        load_dataset(DataConfig(source=str(bad)))
    with pytest.raises(DataError, match="expected 'digits'"):
        load_dataset(DataConfig(source="data.parquet"))
