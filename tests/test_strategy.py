import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedfuse.strategies import CohortFedAvg
from tests.conftest import reply_from


def train_reply(node: int, weights: np.ndarray, n: int, loss: float):
    return reply_from(node, RecordDict({
        "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
    }))


def test_fedavg_equals_example_weighted_mean():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 4)) for _ in range(3)]
    ns = [10, 30, 60]
    strategy = CohortFedAvg("mlp", members=[11, 12, 13])
    replies = [train_reply(11 + i, w, n, float(i)) for i, (w, n) in enumerate(zip(ws, ns))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = sum(n * w for w, n in zip(ws, ns)) / sum(ns)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == np.float64(0 * 0.1 + 1 * 0.3 + 2 * 0.6).item()


def test_replies_from_outside_the_cohort_are_ignored():
    strategy = CohortFedAvg("mlp", members=[1, 2])
    replies = [train_reply(1, np.ones((2,)), 1, 0.0), train_reply(2, np.zeros((2,)), 1, 0.0),
               train_reply(99, np.full((2,), 100.0), 1000, 0.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5, 0.5])


def test_aggregation_order_is_fixed_by_member_rank():
    strategy = CohortFedAvg("mlp", members=[5, 3, 9])
    replies = [train_reply(n, np.zeros(1), 1, 0.0) for n in (9, 5, 3)]
    assert [m.metadata.src_node_id for m in strategy.in_member_order(replies)] == [5, 3, 9]
    a, _ = strategy.aggregate_train(1, replies)
    b, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())
