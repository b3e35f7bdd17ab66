"""Differential privacy: settings validation, the ε accountant and ledger, DP-SGD's
model checks (the DP-SGD round of a site: tests/site/test_private_training.py)."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from torch import nn

from fedfuse.config import config_from_dict, load_config
from fedfuse.data.sites import plan_federation
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.factory import check_dp_body
from fedfuse.models.registry import build_model
from fedfuse.models.spec import ModelSpec
from fedfuse.privacy.accounting import calibrate_noise, default_delta, epsilon_of
from fedfuse.privacy.dpsgd import noise_seed
from fedfuse.privacy.ledger import FileLedgerStore
from tests.helpers import ROOT

BASE = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 3}]}


def build(**privacy):
    return config_from_dict({**BASE, "privacy": privacy})


@pytest.mark.parametrize("privacy, key", [
    ({"mode": "sample", "target_epsilon": 0.0}, "privacy.target_epsilon"),
    ({"mode": "sample", "target_epsilon": -1.0}, "privacy.target_epsilon"),
    ({"mode": "sample", "target_epsilon": float("inf")}, "privacy.target_epsilon"),
    ({"mode": "sample", "target_epsilon": 8.0, "delta": 1.0}, "privacy.delta"),
    ({"mode": "sample", "target_epsilon": 8.0, "delta": 0.0}, "privacy.delta"),
    ({"mode": "sample", "target_epsilon": 8.0, "max_grad_norm": 0.0}, "privacy.max_grad_norm"),
    ({"mode": "sample", "target_epsilon": 8.0, "noise_multiplier": 1.0},
     "privacy.noise_multiplier"),
    ({"mode": "sample"}, "privacy.target_epsilon"),
    ({"mode": "sample", "noise_multiplier": 1.0, "budget_epsilon": 0.0},
     "privacy.budget_epsilon"),
    ({"mode": "loud", "target_epsilon": 8.0}, "privacy.mode"),
])
def test_bad_privacy_settings_are_refused_naming_the_setting(privacy, key):
    with pytest.raises(ConfigError) as err:
        build(**privacy)
    assert err.value.key == key


def test_model_with_batchnorm_is_refused_with_a_fix():
    with pytest.raises(ConfigError) as err:
        check_dp_body(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), ModelSpec("m:bn"),
                      "cohorts[0].arch")
    assert err.value.key == "cohorts[0].arch"
    assert "BatchNorm" in str(err.value) and "GroupNorm" in str(err.value)
    assert "cohorts[0].fix = true" in str(err.value)


@pytest.mark.parametrize("arch", ["logreg", "mlp", "cnn"])
def test_registry_models_are_dp_compatible(arch):
    schema = plan_federation(load_config(ROOT / "simulations" / "digits.toml")).dataset.schema
    check_dp_body(build_model(arch, schema)[1], ModelSpec(arch), "arch")


@pytest.mark.parametrize("n", [7, 48, 100, 999, 5000])
def test_default_delta_is_a_power_of_ten_below_one_over_ten_n(n):
    d = default_delta(n)
    assert d < 1 / (10 * n) and d * 10 >= 1 / (10 * n) * 0.99999
    assert np.isclose(np.log10(d), round(np.log10(d)))


def test_epsilon_of_equals_opacus_rdp_accountant():
    history = [(2.1, 0.5, 60), (1.3, 0.25, 8), (2.1, 0.5, 3)]
    reference = RDPAccountant()
    reference.history = list(history)
    assert epsilon_of(history, 1e-3) == pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)
    assert epsilon_of([], 1e-3) == 0.0


def test_calibrated_noise_spends_just_under_the_target():
    sigma = calibrate_noise(8.0, 1e-3, 0.5, 60)
    spent = epsilon_of([(sigma, 0.5, 60)], 1e-3)
    assert 7.9 < spent <= 8.0
    assert epsilon_of([(sigma * 0.9, 0.5, 60)], 1e-3) > 8.0


def test_noise_seed_depends_on_the_site_secret():
    assert noise_seed(b"a" * 32, 5) == noise_seed(b"a" * 32, 5)
    assert noise_seed(b"a" * 32, 5) != noise_seed(b"b" * 32, 5)
    assert noise_seed(b"a" * 32, 5) != noise_seed(b"a" * 32, 6)


def test_unreadable_ledger_is_refused_not_reset(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    path.write_text("{not json")
    with pytest.raises(FedfuseError, match="unreadable"):
        FileLedgerStore(path).load()
    assert path.read_text() == "{not json"
