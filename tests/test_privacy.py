"""Differential privacy: settings validation, the ε ledger, the DP-SGD client round."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from opacus.accountants import RDPAccountant
from torch import nn

from fedfuse.site.app import build_client_app
from fedfuse.config import config_from_dict, load_config
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.registry import build_model
from fedfuse.privacy.ledger import FileLedgerStore
from fedfuse.privacy.budget import PrivacyRequest
from fedfuse.privacy.accounting import calibrate_noise, default_delta, epsilon_of
from fedfuse.privacy.dpsgd import check_dp_compatible, noise_seed
from fedfuse.config.preflight import check_privacy_settings
from fedfuse.data.sites import Site, plan_federation, simulated_site
from tests.conftest import ROOT, incoming

BASE = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 2}]}


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


def test_delta_not_below_one_over_n_is_refused_before_the_run():
    cfg = load_config(ROOT / "simulations" / "digits.toml",
                      ["privacy.delta=0.05", "privacy.mode=\"sample\"",
                       "privacy.target_epsilon=8.0"])
    plan = plan_federation(cfg)
    sizes = [len(c.train) for c in plan.federation.clients]
    assert 0.05 >= 1 / min(sizes)
    with pytest.raises(ConfigError) as err:
        check_privacy_settings(cfg, sizes, plan.dataset.schema)
    assert err.value.key == "privacy.delta" and str(min(sizes)) in str(err.value)


def test_model_with_batchnorm_is_refused_with_a_fix():
    with pytest.raises(ConfigError) as err:
        check_dp_compatible(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "bn-net")
    assert "BatchNorm" in str(err.value) and "GroupNorm" in str(err.value)


@pytest.mark.parametrize("arch", ["logreg", "mlp", "cnn"])
def test_registry_models_are_dp_compatible(arch):
    schema = plan_federation(load_config(ROOT / "simulations" / "digits.toml")).dataset.schema
    check_dp_compatible(build_model(arch, schema), arch)


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


# -- the real ClientApp, called as a SuperNode would call it ----------------------------


@pytest.fixture(scope="module")
def digits_site() -> tuple[Site, object]:
    cfg = load_config(ROOT / "simulations" / "digits.toml")
    return simulated_site(cfg, 10), plan_federation(cfg).dataset.schema


def train_message(site: Site, schema, request: PrivacyRequest | None, server_round: int = 1,
                  seed: int = 11):
    model = build_model(site.arch, schema, seed=0)
    config = {"lr": 0.5, "local-epochs": 1, "batch-size": 32, "momentum": 0.0,
              "weight-decay": 0.0, "seed": seed, "server-round": server_round}
    if request is not None:
        config.update(request.to_config())
    return incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                "config": ConfigRecord(config)}))


def site_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


REQUEST = PrivacyRequest(mode="sample", accountant="rdp", max_grad_norm=1.0, planned_rounds=3,
                         target_epsilon=4.0, budget=4.0)


def test_ledger_survives_a_site_restart_and_stops_at_the_budget(tmp_path, digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path)
    app = build_client_app(lambda ctx: site)
    spent = []
    for server_round in range(1, 5):
        # A fresh Context each time: the site process restarted between rounds.
        reply = app(train_message(site, schema, REQUEST, server_round), site_context())
        report = reply.content["privacy"]
        spent.append(report["epsilon"])
        if server_round <= 3:
            assert report["status"] == "trained" and "arrays" in reply.content
        else:
            assert report["status"] == "budget-exhausted" and "arrays" not in reply.content
    assert spent[0] < spent[1] < spent[2] <= 4.0 and spent[3] == spent[2]
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert ledger["refused_rounds"] == [4]
    reference = RDPAccountant()
    reference.history = [tuple(h) for h in ledger["history"]]
    assert spent[2] == pytest.approx(reference.get_epsilon(ledger["delta"]), rel=0.01)


def test_a_later_request_cannot_raise_the_sites_budget(tmp_path, digits_site):
    site, schema = digits_site
    site = dataclasses.replace(site, state_dir=tmp_path)
    app = build_client_app(lambda ctx: site)
    app(train_message(site, schema, REQUEST, 1), site_context())
    generous = PrivacyRequest(**{**REQUEST.__dict__, "budget": 100.0})
    reply = app(train_message(site, schema, generous, 2), site_context())
    assert reply.content["privacy"]["budget"] == 4.0


def test_dp_noise_comes_from_the_site_secret_not_the_coordinators_seed(digits_site):
    site, schema = digits_site
    twin = Site(site.name, site.index, site.arch, site.train, site.val, secret=b"x" * 32)

    def update(s: Site) -> dict[str, torch.Tensor]:
        reply = build_client_app(lambda ctx: s)(train_message(s, schema, REQUEST),
                                                site_context())
        return reply.content["arrays"].to_torch_state_dict()

    a, again, b = update(site), update(site), update(twin)
    assert all(torch.equal(a[k], again[k]) for k in a)  # reproducible for the site itself
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff > 1e-3  # same data, same round seed, different secret: different noise


def test_plain_round_carries_no_privacy_record(digits_site):
    site, schema = digits_site
    reply = build_client_app(lambda ctx: site)(train_message(site, schema, None),
                                               site_context())
    assert "privacy" not in reply.content and "arrays" in reply.content
