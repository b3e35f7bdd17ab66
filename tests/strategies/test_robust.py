"""Flower's robust aggregation rules, one per cohort (``fedfuse.strategies.robust``)."""

from __future__ import annotations

import numpy as np
import pytest

from fedfuse.config import config_from_dict
from fedfuse.errors import ConfigError
from fedfuse.strategies import cohort_strategy
from tests.helpers import honest
from tests.helpers import train_update as update

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.mark.parametrize("rule, extra", [("median", {}), ("trimmed_mean", {"trim_fraction": 0.3}),
                                         ("krum", {"max_malicious": 2}),
                                         ("multikrum", {"max_malicious": 2,
                                                        "multikrum_select": 2})])
def test_a_poisoned_minority_stays_within_the_honest_range(rule, extra):
    """7 clients, 2 of them colluding with +1000 in every coordinate: each robust rule
    keeps every coordinate of the aggregate within the honest clients' range; FedAvg
    does not. (Krum needs n > 2f + 2: with n = 5 the two identical attackers win.)"""
    honest_w = [honest(n, n) for n in (1, 2, 3, 4, 5)]
    lo, hi = np.min(honest_w, axis=0), np.max(honest_w, axis=0)

    def replies():  # fresh messages for each strategy (aggregation consumes them)
        return ([update(n, w) for n, w in zip((1, 2, 3, 4, 5), honest_w)]
                + [update(n, np.full((3, 4), 1000.0, dtype=np.float32)) for n in (6, 7)])

    strategy = cohort_strategy(rule, "logreg", list(range(1, 8)), **extra)
    arrays, _ = strategy.aggregate_train(1, replies())
    w = arrays["w"].numpy()
    assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6), (rule, w)

    fedavg, _ = cohort_strategy("fedavg", "logreg", list(range(1, 8))).aggregate_train(
        1, replies())
    assert np.all(fedavg["w"].numpy() > 200)


def test_robust_rules_and_norm_bounds_are_refused_with_secure_aggregation():
    raw = {"name": "t", "cohorts": [{"arch": "logreg", "clients": 4}]}
    with pytest.raises(ConfigError, match="robustness.aggregation: 'median' must see every"):
        config_from_dict({**raw, "robustness": {"aggregation": "median"}})
    with pytest.raises(ConfigError, match="robustness.max_update_norm: needs plaintext"):
        config_from_dict({**raw, "robustness": {"max_update_norm": 5.0}})
    cfg = config_from_dict({**raw, "robustness": {"aggregation": "median"},
                            "secure_aggregation": {"enabled": False}})
    assert cfg.robustness.aggregation == "median"
