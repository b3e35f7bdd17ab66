"""The centralised reference (``fedfuse.simulation.baseline``): the pooled training data
of the scenario's sites, the federated run's test split, one DP-SGD run at the
scenario's ε and δ."""

from __future__ import annotations

from fedfuse.config import config_from_dict
from fedfuse.data.sites import plan_federation
from fedfuse.privacy.accounting import default_delta
from fedfuse.simulation.baseline import baseline, central_epochs, pooled_data

RAW = {"name": "t", "seed": 2, "rounds": 3,
       "cohorts": [{"arch": "logreg", "clients": 3}, {"arch": "mlp", "clients": 3}],
       "privacy": {"mode": "sample", "target_epsilon": 4.0},
       "fusion": {"unlabeled_fraction": 0.25}}


def test_the_pooled_data_are_the_sites_train_splits_and_the_runs_test_split():
    cfg = config_from_dict(RAW)
    train, test = pooled_data(cfg)
    plan = plan_federation(cfg)
    assert len(train) == sum(len(c.train) for c in plan.federation.clients)
    assert len(test) == len(plan.test) - round(0.25 * len(plan.test))  # less the transfer
    assert central_epochs(cfg) == 3  # 3 rounds x 1 local epoch under DP
    assert central_epochs(config_from_dict({**RAW, "privacy": {"mode": "off"}})) == 6


def test_one_pooled_dp_sgd_run_spends_the_scenarios_epsilon():
    cfg = config_from_dict(RAW)
    base = baseline(cfg, epochs=2)
    n = base["cohorts"]["logreg"]["train_examples"]
    for name in ("logreg", "mlp"):
        r = base["cohorts"][name]
        assert r["delta"] == default_delta(n) and r["epochs"] == 2
        assert 3.8 < r["epsilon"] <= 4.0  # calibrated for the run, within tolerance
        assert r["test_accuracy"] > 0.3
    assert base["best_test_accuracy"] == max(r["test_accuracy"]
                                             for r in base["cohorts"].values())
    plain = baseline(config_from_dict({**RAW, "privacy": {"mode": "off"}}), epochs=2)
    assert plain["cohorts"]["logreg"]["epsilon"] is None
    assert plain["cohorts"]["logreg"]["test_accuracy"] > base["cohorts"]["logreg"][
        "test_accuracy"] - 0.02


def test_a_set_delta_is_used():
    cfg = config_from_dict({**RAW, "privacy": {**RAW["privacy"], "delta": 1e-6}})
    assert baseline(cfg, epochs=1)["cohorts"]["logreg"]["delta"] == 1e-6
