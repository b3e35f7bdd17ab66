import numpy as np
import pytest
import torch

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models.registry import REGISTRY, build_model, check_compatible, set_standardization


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
    with pytest.raises(ConfigError, match="'resnet' is neither a built-in architecture"):
        check_compatible("resnet", tab)
    check_compatible("mlp", tab)
