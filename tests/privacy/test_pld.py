"""The PLD accountant (``privacy.accountant = "pld"``): Google's ``dp_accounting`` privacy
loss distributions, pessimistic (an upper bound on ε), tighter than RDP, as tight as
Opacus's PRV accountant and much faster; calibration and the ledger agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.models.training import make_loader, train_epochs
from fedfuse.privacy.accounting import calibrate_noise, epsilon_of, pld_interval
from fedfuse.privacy.dpsgd import make_private
from fedfuse.privacy.ledger import PrivacyLedger

HISTORIES = [
    ([(1.2, 0.25, 120)], 1e-4),  # a default-scenario site: q = 1/4, 30 rounds of 4 steps
    ([(1.5, 1 / 3, 30)], 1e-3),
    ([(1.0, 0.25, 60), (1.5, 1 / 3, 30)], 1e-3),
    ([(2.0, 1.0, 30)], 1e-2),  # client-level releases: q = 1
    ([(0.8, 0.1, 500)], 1e-5),
]


@pytest.mark.parametrize("history, delta", HISTORIES)
def test_pld_is_tighter_than_rdp(history, delta):
    pld, rdp = epsilon_of(history, delta, "pld"), epsilon_of(history, delta, "rdp")
    assert 0.0 < pld < rdp


@pytest.mark.parametrize("history, delta", [HISTORIES[1], HISTORIES[2], HISTORIES[3]])
def test_pld_agrees_with_opacus_prv(history, delta):
    """Two independent tight accountants: within 2 % (0.1–0.2 % when measured)."""
    assert epsilon_of(history, delta, "pld") == pytest.approx(
        epsilon_of(history, delta, "prv"), rel=0.02)


def test_pld_is_dp_accountings_pld_accountant():
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    history, delta = HISTORIES[2]
    accountant = PLDAccountant(value_discretization_interval=pld_interval(history))
    accountant.compose(dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t)
        for s, q, t in history]))
    assert epsilon_of(history, delta, "pld") == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-9)


def test_pld_is_an_upper_bound_close_to_the_exact_value():
    """q = 1: T releases of the Gaussian mechanism with σ are one with σ/√T, whose exact
    ε is known (Balle & Wang 2018). With sampling, the optimistic estimate (a lower
    bound on the exact ε) is below ours."""
    import dp_accounting as dpa
    from dp_accounting.pld import privacy_loss_distribution as pld

    sigma, steps, delta = 3.0, 30, 1e-2
    exact = dpa.get_epsilon_gaussian(sigma / np.sqrt(steps), delta)
    ours = epsilon_of([(sigma, 1.0, steps)], delta, "pld")
    assert exact <= ours <= exact * 1.005
    history = [(1.2, 0.25, 120)]
    optimistic = pld.from_gaussian_mechanism(
        1.2, sampling_prob=0.25, pessimistic_estimate=False,
        value_discretization_interval=pld_interval(history)).self_compose(120)
    assert optimistic.get_epsilon_for_delta(1e-4) <= epsilon_of(history, 1e-4, "pld")


def test_history_entries_compose():
    e1, e2, delta = (1.2, 0.25, 40), (1.5, 0.5, 20), 1e-4
    assert epsilon_of([e1, e2], delta, "pld") > epsilon_of([e1], delta, "pld")
    assert epsilon_of([e1, e2], delta, "pld") == epsilon_of([e2, e1], delta, "pld")
    merged = epsilon_of([(1.2, 0.25, 120)], delta, "pld")
    assert epsilon_of([e1, (1.2, 0.25, 80)], delta, "pld") == pytest.approx(merged, rel=1e-12)
    assert epsilon_of([e1] * 3, delta, "pld") == pytest.approx(merged, rel=1e-12)
    assert epsilon_of([], delta, "pld") == 0.0
    assert epsilon_of([(1.2, 0.25, 0)], delta, "pld") == 0.0
    assert epsilon_of([(0.0, 0.25, 1)], delta, "pld") == float("inf")


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError):
        epsilon_of([(1.0, 0.25, 4)], 1e-4, "zcdp")


def test_pld_calibration_is_tight_and_below_rdp():
    target, delta, q, steps = 8.0, 1e-3, 0.25, 120
    sigma = calibrate_noise(target, delta, q, steps, "pld")
    assert target - 0.005 <= epsilon_of([(sigma, q, steps)], delta, "pld") <= target
    assert epsilon_of([(sigma * 0.99, q, steps)], delta, "pld") > target
    assert sigma < calibrate_noise(target, delta, q, steps, "rdp")


def test_the_ledger_spends_what_pld_calibration_planned():
    """σ calibrated for 30 rounds of 4 steps: the ledger charges all 30 (ε ≤ target, as
    planned) and refuses the 31st."""
    target, delta, q, per_round, rounds = 8.0, 1e-4, 0.25, 4, 30
    sigma = calibrate_noise(target, delta, q, rounds * per_round, "pld")
    ledger = PrivacyLedger("pld", delta, target, sigma)
    for _ in range(rounds):
        assert not ledger.would_exceed(sigma, q, per_round)
        ledger.history.append((sigma, q, per_round))  # unmerged entries: the same ε
    assert ledger.epsilon() <= target
    assert ledger.epsilon() == epsilon_of([(sigma, q, rounds * per_round)], delta, "pld")
    assert ledger.would_exceed(sigma, q, per_round)


def test_make_private_records_the_history_for_pld():
    """Opacus has no PLD accountant: the engine records (σ, q, steps) with its RDP one."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    loader = make_loader(X, y, batch_size=16, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_optimizer, dp_loader, engine = make_private(
        model, optimizer, loader, noise_multiplier=1.1, max_grad_norm=1.0, accountant="pld",
        history=[(1.1, 0.25, 4)], generator=torch.Generator().manual_seed(1))
    train_epochs(dp_model, dp_loader, dp_optimizer, 1)
    history = [tuple(h) for h in engine.accountant.history]
    assert history == [(1.1, 0.25, 8)]
    assert epsilon_of(history, 1e-3, "pld") < epsilon_of(history, 1e-3, "rdp")


def test_scenario_with_pld_loads_and_a_bad_name_is_refused():
    base = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 3}]}
    cfg = config_from_dict({**base, "privacy": {"mode": "sample", "target_epsilon": 8.0,
                                                "accountant": "pld"}})
    assert cfg.privacy.accountant == "pld"
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "privacy": {"mode": "sample", "target_epsilon": 8.0,
                                              "accountant": "pdl"}})
    assert err.value.key == "privacy.accountant"


def test_a_site_trains_under_pld_until_its_budget(tmp_path):
    """The real ClientApp with ``dp-accountant = "pld"``: three planned rounds spend at
    most the target, as calibrated, and the fourth is refused."""
    import dataclasses
    import json

    from fedfuse.config import load_config
    from fedfuse.data.sites import plan_federation, simulated_site
    from fedfuse.privacy.budget import PrivacyRequest
    from fedfuse.site.app import build_client_app
    from tests.helpers import ROOT
    from tests.site.test_private_training import site_context, train_message

    cfg = load_config(ROOT / "simulations" / "digits.toml")
    site = dataclasses.replace(simulated_site(cfg, 10), state_dir=tmp_path)
    schema = plan_federation(cfg).dataset.schema
    request = PrivacyRequest(mode="sample", accountant="pld", max_grad_norm=1.0,
                             planned_rounds=3, target_epsilon=4.0, budget=4.0)
    app = build_client_app(lambda ctx: site)
    reports = [app(train_message(site, schema, request, r), site_context())
               .content["privacy"] for r in range(1, 5)]
    assert [r["status"] for r in reports] == ["trained"] * 3 + ["budget-exhausted"]
    assert all(r["accountant"] == "pld" for r in reports)
    spent = [r["epsilon"] for r in reports]
    assert spent[0] < spent[1] < spent[2] <= 4.0 and spent[3] == spent[2]
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert spent[2] == epsilon_of([tuple(h) for h in ledger["history"]], ledger["delta"], "pld")
    assert spent[2] < epsilon_of([tuple(h) for h in ledger["history"]], ledger["delta"], "rdp")


def test_a_site_refuses_an_accountant_that_gives_no_upper_bound(tmp_path):
    """Opacus's ``gdp`` accountant is an approximation, not a bound: a coordinator
    asking a site to account with it would make it release more than its budget."""
    import dataclasses

    from fedfuse.config import load_config
    from fedfuse.data.sites import plan_federation, simulated_site
    from fedfuse.errors import FedfuseError
    from fedfuse.privacy.budget import PrivacyRequest
    from fedfuse.site.app import build_client_app
    from tests.helpers import ROOT
    from tests.site.test_private_training import site_context, train_message

    cfg = load_config(ROOT / "simulations" / "digits.toml")
    site = dataclasses.replace(simulated_site(cfg, 10), state_dir=tmp_path)
    schema = plan_federation(cfg).dataset.schema
    request = PrivacyRequest(mode="sample", accountant="gdp", max_grad_norm=1.0,
                             planned_rounds=3, target_epsilon=4.0)
    with pytest.raises(FedfuseError, match="accountant 'gdp' gives no upper bound"):
        build_client_app(lambda ctx: site)(train_message(site, schema, request, 1),
                                           site_context())
    assert not (tmp_path / "privacy-ledger.json").exists()
