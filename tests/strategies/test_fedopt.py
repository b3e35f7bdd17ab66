"""Flower's FedProx and FedOpt rules per cohort (``fedfuse.strategies.fedopt``): the
formulas, the checkpointed moments, the sites' proximal step and the refused settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfuse.config import DataConfig
from fedfuse.config.train import TrainConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models.registry import build_model
from fedfuse.models.training import make_loader, make_optimizer, train_epochs
from fedfuse.site.training import proximal_mu
from fedfuse.strategies import cohort_strategy
from fedfuse.wire import WireError
from tests.helpers import NodesGrid, reply_from

pytestmark = pytest.mark.usefixtures("task_identity")  # configure_train makes Messages

FEDOPT = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def reply(node: int, w: np.ndarray, n: int):
    return reply_from(node, RecordDict({
        "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.1})}))


def one_round(strategy, server_round: int, current: np.ndarray, updates) -> np.ndarray:
    """configure (the strategy keeps ``current``), then aggregate ``updates``."""
    strategy.configure_train(server_round, ArrayRecord({"w": Array(current)}),
                             ConfigRecord({"lr": 0.1}), NodesGrid([1, 2]))
    arrays, _ = strategy.aggregate_train(server_round, [reply(n, w, k) for n, w, k in updates])
    return arrays["w"].numpy()


def test_fedadam_steps_along_the_averaged_update_by_its_formula():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    a, b = (w0 + rng.normal(0, 0.1, w0.shape)).astype(np.float32), w0.copy()
    strategy = cohort_strategy("fedavg", "mlp", [1, 2], strategy="fedadam", fedopt=FEDOPT)
    got = one_round(strategy, 1, w0, [(1, a, 30), (2, b, 10)])
    delta = (30 * a + 10 * b) / 40 - w0
    m = 0.1 * delta
    v = 0.01 * delta ** 2
    eta = 0.05 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    np.testing.assert_allclose(got, w0 + eta * m / (np.sqrt(v) + 1e-3), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_the_server_moments_survive_a_checkpoint(name):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    rounds = [[(1, (w + rng.normal(0, 0.1, w.shape)).astype(np.float32), 20),
               (2, (w + rng.normal(0, 0.1, w.shape)).astype(np.float32), 20)]
              for _ in range(3)]
    straight = cohort_strategy("fedavg", "mlp", [1, 2], strategy=name, fedopt=FEDOPT)
    first = one_round(straight, 1, w, rounds[0])
    second = one_round(straight, 2, first, rounds[1])
    third = one_round(straight, 3, second, rounds[2])
    resumed = cohort_strategy("fedavg", "mlp", [1, 2], strategy=name, fedopt=FEDOPT)
    again = one_round(resumed, 1, w, rounds[0])
    restored = cohort_strategy("fedavg", "mlp", [1, 2], strategy=name, fedopt=FEDOPT)
    restored.restore_state(resumed.state_arrays(), ArrayRecord({"w": Array(again)}))
    assert set(resumed.state_arrays()) >= {"m_t/w", "v_t/w"}
    np.testing.assert_array_equal(one_round(restored, 2, again, rounds[1]), second)
    np.testing.assert_array_equal(one_round(restored, 3, second, rounds[2]), third)


def test_fedprox_sends_its_mu_and_the_site_steps_toward_the_received_weights():
    strategy = cohort_strategy("fedavg", "mlp", [1, 2], strategy="fedprox", proximal_mu=0.5)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}),
                                         ConfigRecord({"lr": 0.1}), NodesGrid([1, 2])))
    assert [m.content["config"]["proximal-mu"] for m in sent] == [0.5, 0.5]
    data = load_dataset(DataConfig())
    distance = {}
    for mu in (0.0, 5.0):
        model = build_model("mlp", data.schema, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = make_optimizer(model, 0.1, 0.0, 0.0)
        train_epochs(model, make_loader(data.X[:400], data.y[:400], 16, seed=0), optimizer, 2,
                     proximal_mu=mu)
        distance[mu] = float(sum(((p.detach() - s) ** 2).sum()
                                 for p, s in zip(model.parameters(), start)) ** 0.5)
    assert 0 < distance[5.0] < 0.5 * distance[0.0]


@pytest.mark.parametrize("value", [-1.0, float("nan"), 1e6, "a"])
def test_a_site_refuses_a_proximal_mu_out_of_range(value):
    with pytest.raises(WireError, match="proximal-mu"):
        proximal_mu(ConfigRecord({"proximal-mu": value}))
    assert proximal_mu(ConfigRecord({"lr": 0.1})) == 0.0


@pytest.mark.parametrize("settings, key, needle", [
    ({"strategy": "scaffold"}, "strategy", "not one of"),
    ({"strategy": "fedprox"}, "proximal_mu", "fedprox needs proximal_mu > 0"),
    ({"proximal_mu": 0.1}, "proximal_mu", "only fedprox takes one"),
    ({"strategy": "fedadam", "server_momentum": 0.9}, "strategy", "server optimiser of its own"),
    ({"strategy": "fedyogi", "server_beta_2": 1.0}, "server_beta_2", r"in \[0, 1\)"),
])
def test_bad_strategy_settings_are_refused_with_their_key(settings, key, needle):
    with pytest.raises(ConfigError, match=needle) as refused:
        TrainConfig(**settings)
    assert refused.value.key == key


def test_a_fedopt_rule_is_refused_beside_a_robust_aggregation(scenario):
    from fedfuse.config import load_config

    path = scenario()
    with pytest.raises(ConfigError, match="replaces: use one or the other"):
        load_config(path, overrides=["train.strategy=fedadam",
                                     "robustness.aggregation=median",
                                     "secure_aggregation.enabled=false"])
